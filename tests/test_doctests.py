"""The Examples sections of the public API's docstrings run, and print what they show."""

from __future__ import annotations

import doctest
import importlib
import tempfile

import pytest

# (module, attribute path): the objects whose docstrings carry numpydoc Examples.
DOCUMENTED = [
    ("diffcut.method.ncut", "recursive_ncut"),
    ("diffcut.method.split_tree", "SplitTree.prune"),
    ("diffcut.method.assign", "assign_concepts"),
    ("diffcut.method.features", "FeatureExtractor.from_pretrained"),
    ("diffcut.job.schema", "read_labels"),
    ("diffcut.job.pipeline", "label_dataset"),  # starts an embedded Ray: the slowest example
]


@pytest.mark.parametrize("module_name, path", DOCUMENTED, ids=[path for _, path in DOCUMENTED])
def test_docstring_examples_run(module_name, path, tmp_path, monkeypatch):
    # The examples' tempfile.mkdtemp() folders land in pytest's tmp_path, which pytest cleans up.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    obj = importlib.import_module(module_name)
    for part in path.split("."):
        obj = getattr(obj, part)
    tests = doctest.DocTestFinder(recurse=False).find(obj, name=f"{module_name}.{path}", globs={})
    assert len(tests) == 1 and len(tests[0].examples) >= 3, f"{path} has no Examples section"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    result = runner.run(tests[0], out=report.append)
    assert result.failed == 0, "".join(report)
