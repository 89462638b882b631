"""Deprecated import paths of the modules that moved into subpackages (issue 16).

Until 0.1.0 every module sat flat in ``diffcut/``. They now live in the part they
belong to (``method``, ``job``, ``evaluation``, ``tools``). For one release the old
paths keep working: ``import diffcut.pipeline`` (or ``from diffcut import schema``)
returns the very module object of the new home, so attributes, private helpers and
monkeypatching behave exactly as before, and a ``DeprecationWarning`` names the new
path. To be removed in 0.3.0.

``diffcut.schema`` is the exception: it is public API (``diffcut.schema.read_labels``,
the readers' entry point in README.md and docs/output-format.md), so it stays a
permanent alias of ``diffcut.job.schema`` and does not warn.

Why an import hook and not a one-line file at each old path: a file at the old
path would make git see "modified" instead of "renamed", so edits made on other
branches to the old files would not follow the move when merged.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "diffcut.features": "diffcut.method.features",
    "diffcut.tiny": "diffcut.method.tiny",
    "diffcut.ncut": "diffcut.method.ncut",
    "diffcut.assign": "diffcut.method.assign",
    "diffcut.refine": "diffcut.method.refine",
    "diffcut.segmenter": "diffcut.method.segmenter",
    "diffcut.naming": "diffcut.method.naming",
    "diffcut.io": "diffcut.job.io",
    "diffcut.webdataset": "diffcut.job.webdataset",
    "diffcut.pipeline": "diffcut.job.pipeline",
    "diffcut.schema": "diffcut.job.schema",
    "diffcut.evaluate": "diffcut.evaluation.protocol",
    "diffcut.datasets": "diffcut.evaluation.datasets",
    "diffcut.rethreshold": "diffcut.tools.rethreshold",
    "diffcut.discover": "diffcut.tools.discover",
    "diffcut.export": "diffcut.tools.export",
    "diffcut.gallery": "diffcut.tools.gallery",
    "diffcut.visualize": "diffcut.tools.visualize",
    "diffcut.training": "diffcut.tools.training",
}

#: Old paths that stay for good, without a warning (public API).
STABLE = frozenset({"diffcut.schema"})


class _MovedModuleLoader(importlib.abc.Loader):
    """Hands back the module of the new home instead of creating one."""

    def __init__(self, new_name: str):
        self.new_name = new_name

    def create_module(self, spec):
        if spec.name not in STABLE:
            warnings.warn(f"{spec.name} is deprecated; import {self.new_name} instead", DeprecationWarning,
                          stacklevel=2)
        return importlib.import_module(self.new_name)

    def exec_module(self, module) -> None:
        """Nothing to run: the new home's module is already executed."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves the old flat module paths of ``MOVED`` to their new homes."""

    def find_spec(self, fullname, path=None, target=None):
        new_name = MOVED.get(fullname)
        if new_name is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(new_name))


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
