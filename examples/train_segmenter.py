"""Train a small semantic segmentation network on diffcut's pseudo-labels.

    python examples/train_segmenter.py --input samples --classes examples/sample-classes --steps 60

The targets are the dataset-level classes of ``jobs/discover.py`` (the same
class id means the same kind of segment in every image), paired with the
input images by ``diffcut.tools.training.LabeledImages``; image and mask get the
same resize. The network is a few convolutions (a downsampling encoder and a
bilinear upsampling head), trained with per-pixel cross-entropy and Adam on
the CPU. The bundled labels (``examples/sample-labels``,
``examples/sample-classes``, remade by ``examples/make_sample_labels.sh``)
come from the tiny random model: the run shows the plumbing and a falling
loss, not a useful segmenter. Run it from the repository root (the label
rows name the images by their paths relative to it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffcut.tools.discover import read_centroids
from diffcut.tools.training import LabeledImages


class SmallSegmenter(nn.Module):
    """Two stride-2 convolution blocks, a 3x3 context block, a 1x1 classifier, bilinear upsampling."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.encoder(images))
        return nn.functional.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def train(
    input: str,
    classes: str,
    *,
    steps: int = 60,
    size: int = 64,
    batch_size: int = 6,
    lr: float = 1e-2,
    seed: int = 0,
    log=print,
) -> list[float]:
    """Train for ``steps`` optimizer steps; returns the loss of every step."""
    torch.manual_seed(seed)
    num_classes = int(read_centroids(classes).shape[0])
    pairs = LabeledImages(input, classes=classes, size=size)
    model = SmallSegmenter(num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    passes = 0
    while len(losses) < steps:
        passes += 1
        for images, targets in DataLoader(pairs, batch_size=batch_size):
            loss = nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            log(f"step {len(losses):4d}  loss {losses[-1]:.4f}")
            if len(losses) >= steps:
                break
        if not pairs.counts["pairs"]:
            raise SystemExit("no (image, target) pairs: check --input and --classes (run from the repository root)")
    log(
        f"{pairs.counts['pairs']} (image, target) pairs in {passes} passes over the data; skipped: "
        + json.dumps({k: v for k, v in pairs.counts.items() if k != "pairs"})
    )
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--input", default="samples", help="the images the labels were made from (diffcut label --input)"
    )
    parser.add_argument("--classes", default="examples/sample-classes", help="output of jobs/discover.py")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--size", type=int, default=64, help="train at size x size (image and mask resized alike)")
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    losses = train(
        args.input,
        args.classes,
        steps=args.steps,
        size=args.size,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    window = max(1, min(5, len(losses) // 2))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"mean loss of the first {window} steps {first:.4f}, of the last {window} steps {last:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
