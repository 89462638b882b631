"""Write the bundled sample images (synthetic, deterministic, about 30 KB in all).

Run from the repository root: ``python samples/make_samples.py``. The images
are drawn from fixed seeds -- flat regions, gradients and texture, so a
segmentation has something to find -- in the sizes, aspect ratios and formats
the labeling job has to handle: landscape and portrait JPEG, a JPEG stored
sideways with an EXIF orientation tag, square and panoramic PNG, and a PNG
with transparency.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent

# EXIF tag 0x0112 (Orientation); 6 = "rotate 90 degrees clockwise to display".
_ORIENTATION = 0x0112


def _gradient(width: int, height: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    colors = (1 - ramp) * np.array(top) + ramp * np.array(bottom)
    return Image.fromarray(np.broadcast_to(colors, (height, width, 3)).astype(np.uint8), "RGB")


def _texture(image: Image.Image, seed: int, strength: float) -> Image.Image:
    """Add soft, seeded grain so regions are not perfectly flat (as in photos)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, strength, size=(image.height, image.width, 1))
    pixels = np.asarray(image, dtype=np.float64) + noise
    grain = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return grain.filter(ImageFilter.GaussianBlur(0.8))


def landscape() -> Image.Image:
    """320 x 240: sky, sun, hills, a house."""
    image = _gradient(320, 240, (90, 150, 230), (200, 225, 250))
    draw = ImageDraw.Draw(image)
    draw.ellipse((230, 25, 280, 75), fill=(250, 220, 80))
    draw.polygon([(0, 170), (90, 120), (200, 165), (320, 130), (320, 240), (0, 240)], fill=(70, 140, 60))
    draw.rectangle((60, 150, 130, 205), fill=(180, 80, 60))
    draw.polygon([(55, 150), (95, 118), (135, 150)], fill=(110, 50, 40))
    return _texture(image, seed=1, strength=6)


def portrait() -> Image.Image:
    """240 x 360: a figure-like blob in front of a wall and a floor."""
    image = Image.new("RGB", (240, 360), (215, 205, 180))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 250, 240, 360), fill=(120, 90, 60))
    draw.ellipse((85, 60, 155, 130), fill=(230, 180, 150))
    draw.rounded_rectangle((70, 125, 170, 300), radius=30, fill=(40, 70, 150))
    draw.rectangle((15, 30, 60, 120), fill=(60, 130, 90))
    return _texture(image, seed=2, strength=5)


def tiles() -> Image.Image:
    """256 x 256 PNG: four coloured quadrants and a disc across them."""
    image = Image.new("RGB", (256, 256))
    draw = ImageDraw.Draw(image)
    for (x, y), color in zip(
        [(0, 0), (128, 0), (0, 128), (128, 128)], [(200, 60, 60), (60, 170, 80), (60, 90, 200), (220, 200, 70)]
    ):
        draw.rectangle((x, y, x + 127, y + 127), fill=color)
    draw.ellipse((78, 78, 178, 178), fill=(240, 240, 240))
    return image


def panorama() -> Image.Image:
    """448 x 160 PNG: sea, beach and three rocks (aspect 2.8)."""
    image = Image.new("RGB", (448, 160), (60, 120, 190))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 448, 55), fill=(170, 205, 240))
    draw.rectangle((0, 115, 448, 160), fill=(225, 205, 150))
    for x in (60, 200, 340):
        draw.ellipse((x, 90, x + 60, 135), fill=(90, 85, 80))
    return image


def transparent_logo() -> Image.Image:
    """200 x 200 RGBA PNG: shapes on a transparent background."""
    image = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, 120, 120), fill=(220, 40, 90, 255))
    draw.rectangle((90, 90, 180, 180), fill=(30, 160, 200, 255))
    return image


def sideways_photo() -> tuple[Image.Image, Image.Image.Exif]:
    """A 240 x 180 scene stored rotated (180 x 240 pixels) with EXIF orientation 6."""
    upright = _gradient(240, 180, (250, 190, 120), (120, 60, 90))
    draw = ImageDraw.Draw(upright)
    draw.rectangle((0, 130, 240, 180), fill=(40, 40, 50))
    draw.ellipse((20, 40, 90, 110), fill=(250, 240, 200))
    stored = _texture(upright, seed=3, strength=4).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[_ORIENTATION] = 6
    return stored, exif


def main(target: Path = HERE) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    written = []

    def save(image: Image.Image, name: str, **options) -> None:
        path = target / name
        image.save(path, **options)
        written.append(path)

    save(landscape(), "landscape.jpg", quality=85)
    save(portrait(), "portrait.jpg", quality=85)
    stored, exif = sideways_photo()
    save(stored, "sideways_exif.jpg", quality=85, exif=exif)
    save(tiles(), "tiles.png", optimize=True)
    save(panorama(), "panorama.png", optimize=True)
    save(transparent_logo(), "logo_rgba.png", optimize=True)
    return written


if __name__ == "__main__":
    paths = main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
    total = sum(p.stat().st_size for p in paths)
    for path in paths:
        print(f"{path.name:20s} {path.stat().st_size:7,d} bytes")
    print(f"{len(paths)} images, {total:,} bytes")
