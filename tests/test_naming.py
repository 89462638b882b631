"""diffcut.method.naming on the tiny random ConvNeXt CLIP, built locally and loaded by the real loading code."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_webdataset import TINY

from diffcut.job import schema
from diffcut.job.writer import UNIT_COLUMNS
from diffcut.method import naming


@pytest.fixture(scope="module")
def namer():
    torch.set_num_threads(1)
    vocabulary = naming.parse_vocabulary("sky\ncat, kitty\ndog\n")
    return naming.SegmentNamer("tiny-random", vocabulary, device="cpu", resolution=128)


def test_builtin_vocabularies_are_the_published_class_lists():
    voc, context, coco = (naming.load_vocabulary(name) for name in naming.BUILTIN_VOCABULARIES)
    assert (len(voc), len(context), len(coco)) == (21, 60, 81)
    assert voc.synonyms[0][0] == "background" and voc.synonyms[1] == (
        "aeroplane",
        "airplane",
        "aeroplanes",
        "airplanes",
    )
    assert context.class_names[:2] == ["background", "aeroplane"] and context.class_names[-1] == "wood piece"
    assert coco.class_names[1] == "person" and coco.class_names[-1] == "toothbrush"


def test_vocabulary_file_format(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# mine\nroad, street\n\n  tree \n")
    vocabulary = naming.load_vocabulary(str(path))
    assert vocabulary.synonyms == (("road", "street"), ("tree",)) and vocabulary.class_names == ["road", "tree"]
    with pytest.raises(ValueError, match="neither"):
        naming.load_vocabulary(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no class names"):
        naming.load_vocabulary(str(tmp_path / "empty.txt"))


def test_text_classifier_is_one_normalized_template_average_per_synonym(namer):
    assert namer.text.shape[0] == 4  # sky, cat, kitty, dog
    assert namer.synonym_class.tolist() == [0, 1, 1, 2]
    np.testing.assert_allclose(namer.text.norm(dim=-1).numpy(), 1.0, rtol=1e-5)
    # The average over the 14 ViLD templates, recomputed prompt by prompt.
    with torch.no_grad():
        rows = []
        for template in naming.VILD_PROMPTS:
            tokens, positions = namer.tokenize([template.format("kitty")])
            row = namer.clip.encode_text(tokens, positions)[0]
            rows.append(row / row.norm())
        expected = torch.stack(rows).mean(0)
    np.testing.assert_allclose(namer.text[2].numpy(), (expected / expected.norm()).numpy(), atol=1e-5)


def test_classify_takes_the_best_synonym_and_clamps_the_logit_scale():
    text = torch.eye(3)
    logits = naming.classify(
        torch.tensor([[0.0, 0.0, 2.0]]), text, torch.tensor([0, 1, 1]), 2, torch.tensor(10.0)
    )  # exp(10) is clamped to 100
    np.testing.assert_allclose(logits.numpy(), [[0.0, 100.0]], atol=1e-4)


def test_planted_region_gets_the_class_its_embedding_was_built_to_match(namer):
    """Left half planted red; the visual projection is set so the pooled left half maps onto 'kitty', the right
    half onto 'dog'. The pooled vectors are recomputed here by slicing the dense grid (128 px -> 4x4 cells)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    image[:, :48] = (220, 30, 30)
    mask = np.zeros((96, 96), np.int64)
    mask[:, 48:] = 1
    clip = namer.clip
    original = clip.visual.head.mlp.fc2.weight.detach().clone()
    try:
        with torch.no_grad():
            dense = clip.dense_features(namer.preprocess(image))[0]
            assert dense.shape[-2:] == (4, 4)
            pooled = torch.stack([dense[:, :, :2].mean((1, 2)), dense[:, :, 2:].mean((1, 2))])
            x = clip.visual.trunk.head(pooled[:, :, None, None])
            hidden = clip.visual.head.mlp.act(clip.visual.head.mlp.fc1(x))  # (2, hidden)
            targets = torch.stack([namer.text[2], namer.text[3]])  # kitty, dog
            clip.visual.head.mlp.fc2.weight.copy_(targets.T @ torch.linalg.pinv(hidden.T))
        names = namer.name(image, mask, num_segments=3)
    finally:
        with torch.no_grad():
            clip.visual.head.mlp.fc2.weight.copy_(original)
    assert names.class_id.tolist() == [1, 2, -1]  # segment 2 has no pixel
    assert names.class_score[2] == 0 and 0 < names.class_score[0] <= 1
    assert names.semantic_mask.shape == mask.shape
    assert (names.semantic_mask[:, :48] == 1).all() and (names.semantic_mask[:, 48:] == 2).all()


def test_mask_smaller_than_a_grid_cell_is_still_pooled():
    dense = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 1, 1] = True  # one pixel of a 16x16 cell: empty after bilinear resizing
    pooled, present = naming.mask_pool(dense, masks)
    assert present.tolist() == [True]
    np.testing.assert_allclose(pooled[0].numpy(), dense[:, 0, 0].numpy(), rtol=1e-5)


def test_loading_is_strict_and_safetensors_only(tmp_path):
    source = naming.tiny_naming_path()
    copy = tmp_path / "clip"
    shutil.copytree(source, copy)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(copy / "open_clip_model.safetensors"))
    weights.pop("visual.head.mlp.fc2.weight")
    save_file(weights, str(copy / "open_clip_model.safetensors"))
    with pytest.raises(RuntimeError, match="fc2.weight"):
        naming.load_clip(str(copy))
    (copy / "open_clip_model.safetensors").unlink()
    torch.save({}, copy / "open_clip_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        naming.load_clip(str(copy))
    config = json.loads((source / "open_clip_config.json").read_text())["model_cfg"]
    assert config["vision_cfg"]["timm_proj"] == "mlp"


def test_published_architecture_has_open_clip_parameter_names():
    with torch.device("meta"):
        model = naming.build_clip(naming.CONVNEXT_LARGE_D_320)
    names = set(model.state_dict())
    for key in (
        "visual.trunk.stem.0.weight",
        "visual.trunk.stages.2.blocks.26.gamma",
        "visual.trunk.stages.3.downsample.1.weight",
        "visual.trunk.head.norm.bias",
        "visual.head.mlp.fc1.bias",
        "visual.head.mlp.fc2.weight",
        "token_embedding.weight",
        "transformer.resblocks.15.attn.in_proj_weight",
        "ln_final.weight",
        "text_projection",
        "logit_scale",
    ):
        assert key in names
    assert "visual.head.mlp.fc2.bias" not in names and "attn_mask" not in names
    assert model.visual.head.mlp.fc2.weight.shape == (768, 1536)


def test_names_matching_scores_class_ids_without_matching():
    from diffcut.evaluation.protocol import SegmentationEvaluator

    evaluator = SegmentationEvaluator(3, matching="names", size=None)
    labels = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    # Image 1: all right but one class-2 pixel called 7 (outside the vocabulary).
    evaluator.update(np.array([[0, 0, 1, 1], [2, 7, 0, 0]]), labels)
    # Image 2: classes 0 and 1 swapped; a Hungarian matching would have scored it perfect.
    evaluator.update(np.array([[1, 1, 0, 0], [2, 2, 1, 1]]), labels)
    result = evaluator.compute()
    # Dataset counts: class 0 TP 2 FP 2 FN 2; class 1 TP 2 FP 2 FN 2; class 2 TP 3 FP 0 FN 1.
    np.testing.assert_allclose(result.per_class_iou, [2 / 6, 2 / 6, 3 / 4])
    assert result.miou == pytest.approx((2 / 6 + 2 / 6 + 3 / 4) / 3)
    # Per image: (1 + 1 + 1/2) / 3 and (0 + 0 + 1) / 3, averaged over the two images.
    assert result.per_image_miou == pytest.approx(((2.5 / 3) + (1 / 3)) / 2)
    assert result.pixel_accuracy == pytest.approx(7 / 12)
    assert result.to_dict()["per_image_miou"] == pytest.approx(result.per_image_miou)


def _segmented_row(tmp_path, image_bytes):
    mask = np.zeros((32, 48), np.int64)
    mask[:, 24:] = 1
    row = schema.ok_row(
        image_id="a",
        source=str(tmp_path / "a.png"),
        width=48,
        height=32,
        mask=mask,
        latent_labels=np.array([[0, 1]]),
        descriptors=np.eye(2, 4),
        tree={},
        params="{}",
    )
    row["image_bytes"] = image_bytes
    return row


def test_naming_stage_names_rows_and_turns_failures_into_error_rows(tmp_path):
    import io as _io

    from PIL import Image

    from diffcut.job.settings import LabelSettings
    from diffcut.job.stages import NamingStage, SegmentStage

    torch.set_num_threads(1)
    buffer = _io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), 90, np.uint8)).save(buffer, format="PNG")
    stage = NamingStage(
        LabelSettings(vocabulary="voc", naming_model="tiny-random"),
        "cpu",
        params='{"vocabulary":"voc"}',
        max_image_pixels=10**8,
    )
    good = _segmented_row(tmp_path, buffer.getvalue())
    broken = _segmented_row(tmp_path, b"not an image")
    failed = schema.error_row("b", "b.png", "decode failed: truncated", params="{}")
    failed["image_bytes"] = None
    rows = [good, broken, failed]
    batch = schema.rows_to_table([{k: v for k, v in r.items() if k != "image_bytes"} for r in rows])
    batch = batch.append_column("image_bytes", pa.array([r["image_bytes"] for r in rows], pa.binary()))
    unit_columns = [pa.array(["u"] * 3), pa.array([-1, -1, 3], pa.int64())]
    for field, column in zip(UNIT_COLUMNS, unit_columns):
        batch = batch.append_column(field, column)
    table = stage(batch)
    # The named label columns, then the unit columns passed through for the write stage.
    assert table.select(schema.NAMED_LABELS_SCHEMA.names).schema == schema.NAMED_LABELS_SCHEMA
    assert table.column("unit_rows").to_pylist() == [-1, -1, 3]
    table = table.select(schema.NAMED_LABELS_SCHEMA.names)
    named, error, passed = table.to_pylist()
    assert [s["class_name"] for s in named["segments"]] == [voc_name(s["class_id"]) for s in named["segments"]]
    assert all(0 <= s["class_id"] < 21 and 0 < s["class_score"] <= 1 for s in named["segments"])
    semantic = schema.decode_mask(named["semantic_mask"])
    mask = schema.decode_mask(named["mask"])
    for segment in named["segments"]:
        assert (semantic[mask == segment["segment_id"]] == segment["class_id"]).all()
    assert error["status"] == "error" and error["error"].startswith("naming failed") and error["segments"] is None
    assert error["params"] == '{"vocabulary":"voc"}'
    assert passed["status"] == "error" and passed["error"] == "decode failed: truncated"
    # Without naming the segment stage writes the plain schema and no image column.
    plain = SegmentStage(LabelSettings(), "{}", 10**8)
    assert "image_bytes" not in plain.__dict__ and plain.carry_image is False


def voc_name(class_id):
    return naming.load_vocabulary("voc").class_names[class_id]


@pytest.mark.slow
def test_label_job_with_a_vocabulary_names_every_segment(sample_dir, tmp_path):
    from diffcut.job.pipeline import label_dataset
    from diffcut.job.settings import job_arguments

    output = str(tmp_path / "named")
    summary = label_dataset(
        str(sample_dir),
        output,
        **job_arguments(
            dict(
                TINY,
                mask_size="48",
                vocabulary="context",
                naming_model="tiny-random",
                naming_pool_max=1,
                naming_cpus=0.5,
            )
        ),
    )
    assert summary["params"]["vocabulary"] == "context" and summary["params"]["naming_model"] == "tiny-random"
    table = schema.read_labels(output)
    assert table.schema.names == list(schema.NAMED_COLUMNS)
    rows = table.to_pylist()
    assert len(rows) == summary["inputs_listed"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(s["class_name"] is not None or s["area"] == 0 for r in ok for s in r["segments"])
    for row in ok:
        semantic, mask = schema.decode_mask(row["semantic_mask"]), schema.decode_mask(row["mask"])
        for segment in row["segments"]:
            if segment["area"]:
                assert (semantic[mask == segment["segment_id"]] == segment["class_id"]).all()
    assert all(r["semantic_mask"] is None for r in rows if r["status"] == "error")


def test_evaluate_names_scores_the_semantic_mask_of_a_named_output(tmp_path, capsys):
    """--matching names on the job's Parquet output reads semantic_mask (class ids), not mask (segment ids)."""
    import pyarrow.parquet as pq
    from PIL import Image

    from diffcut.cli import main

    truth = np.zeros((8, 8), np.uint8)
    truth[:, 4:] = 2
    segments = np.zeros((8, 8), np.int64)
    segments[:, 4:] = 1  # segment 1 is class 2: scoring the segment ids would be wrong
    (tmp_path / "gt").mkdir()
    Image.fromarray(truth).save(tmp_path / "gt" / "a.png")
    row = schema.ok_row(
        image_id="a.jpg",
        source="a.jpg",
        width=8,
        height=8,
        mask=segments,
        latent_labels=np.array([[0, 1]]),
        descriptors=np.eye(2, 4),
        tree={},
        params="{}",
    )
    schema.named_row(
        row,
        naming.Names(np.array([0, 2]), np.array([0.9, 0.8], np.float32), np.array([0, 2])[segments]),
        ["background", "cat", "dog"],
    )
    pq.write_table(schema.rows_to_table([row], schema.NAMED_LABELS_SCHEMA), tmp_path / "labels-x-0.parquet")
    argv = [
        "evaluate",
        "-p",
        str(tmp_path / "labels-x-0.parquet"),
        "-g",
        str(tmp_path / "gt"),
        "-n",
        "3",
        "--matching",
        "names",
        "--size",
        "0",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["miou"] == 1.0 and result["per_class_iou"] == [1.0, None, 1.0]
    plain = dict(row)
    plain.pop("semantic_mask")
    plain["segments"] = [{k: s[k] for k in ("segment_id", "area", "bbox", "descriptor")} for s in row["segments"]]
    pq.write_table(schema.rows_to_table([plain]), tmp_path / "labels-x-0.parquet")
    assert main(argv) == 1
    assert "made with --vocabulary" in capsys.readouterr().err
