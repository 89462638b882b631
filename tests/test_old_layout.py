"""An output written by an earlier diffcut (``labels-*.parquet`` directly under it) is refused in one clear
line by every reader: the library and each command (exit status 2, as every input error)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffcut.cli import main as cli_main
from diffcut.job import schema, units


@pytest.fixture
def old_output(tmp_path):
    output = tmp_path / "old"
    output.mkdir()
    row = schema.error_row("a.jpg", "a.jpg", "not an image", params="{}")
    pq.write_table(schema.rows_to_table([row]), output / "labels-x.parquet")
    return output


def test_readers_refuse_the_old_layout(old_output, tmp_path, capsys):
    with pytest.raises(units.OldLayoutError, match=r"layout of an earlier diffcut \(labels-x\.parquet"):
        schema.read_labels(str(old_output))
    truth = tmp_path / "truth"
    truth.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(truth / "a.png")
    commands = {
        "export": ["-f", "coco", "-o", str(tmp_path / "coco.json")],
        "gallery": ["-o", str(tmp_path / "gallery")],
        "rethreshold": ["-t", "0.1", "-o", str(tmp_path / "re")],
        "discover": ["-k", "2", "-o", str(tmp_path / "classes")],
        "evaluate": ["-g", str(truth), "-n", "2"],
    }
    for command, flags in commands.items():
        given = ["-p", str(old_output)] if command == "evaluate" else ["-i", str(old_output)]
        assert cli_main([command, *given, *flags]) == 2, command
        err = capsys.readouterr().err
        assert "layout of an earlier diffcut (labels-x.parquet" in err and "new --output" in err, command
        assert err.count("\n") == 1, command
    assert not (tmp_path / "gallery").exists() and not (tmp_path / "re").exists()
