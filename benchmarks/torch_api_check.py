"""Does the GPU path call only torch APIs that an older torch has? A static check against its source.

The lent GPU machine runs its own torch (2.11, CUDA 13); this project is developed on 2.13, and a
CUDA build of 2.11 does not import on a machine without its CUDA runtime wheels (gigabytes). So
this reads the old release's Python sources and type stubs instead (they are in its wheel): every
``torch.*`` name the GPU path uses (module attributes, ``from torch... import``), every keyword it
passes to them, and every method of a torch class (tensor, module, CUDA event and stream,
generator, FLOP counter) it calls with its keywords must be defined there.

The same check runs against the installed torch first: a use it cannot resolve there is a gap of
this checker, not of the old torch, and fails the run too.

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        torch==2.11.0 -d /tmp/torch211
    unzip -q /tmp/torch211/torch-2.11.0-*.whl 'torch/*.py' 'torch/*.pyi' -d /tmp/torch211/src
    python benchmarks/torch_api_check.py /tmp/torch211/src/torch

Exit status 0 when every use resolves in both trees.
"""

from __future__ import annotations

import argparse
import ast
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What runs on the lent machine: the extractor, its truncated UNet, the feature batches, the benchmark.
GPU_PATH = [
    "diffcut/method/features.py",
    "diffcut/method/unet.py",
    "diffcut/job/feature_batches.py",
    "benchmarks/gpu_stage.py",
]
#: torch classes whose methods the GPU path calls on instances: (class, file under torch/, class name there).
INSTANCE_CLASSES = [
    ("Tensor", "_tensor.py", "Tensor"),
    ("Tensor", "_C/__init__.pyi", "TensorBase"),
    ("nn.Module", "nn/modules/module.py", "Module"),
    ("cuda.Event", "cuda/streams.py", "Event"),
    ("cuda.Stream", "cuda/streams.py", "Stream"),
    ("Generator", "_C/__init__.pyi", "Generator"),
    ("utils.flop_counter.FlopCounterMode", "utils/flop_counter.py", "FlopCounterMode"),
]
#: Where ``torch.<name>`` comes from besides torch/__init__.py (filled from C at import time).
TOP_LEVEL_STUBS = ["_C/__init__.pyi", "_C/_VariableFunctions.pyi", "functional.py"]


# ----------------------------------------------------------------------------- the uses
def uses(path: Path) -> tuple[dict[str, set], dict[str, set]]:
    """``{dotted torch name: keywords}`` and ``{method name: keywords}`` of calls on other receivers."""
    tree = ast.parse(path.read_text())
    alias = {"torch": "torch"}  # ``torch = self.torch`` too: the name is torch wherever it appears
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for name in node.names:
                if name.name.split(".")[0] == "torch":
                    alias[name.asname or name.name.split(".")[0]] = name.name if name.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            for name in node.names:
                alias[name.asname or name.name] = f"{node.module}.{name.name}"
    names: dict[str, set] = {}
    methods: dict[str, set] = {}
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    calls = {id(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in alias.values():
            continue
        if not isinstance(node, (ast.Attribute, ast.Name)) or id(node) in inner:
            continue
        call = calls.get(id(node))
        keywords = {k.arg for k in call.keywords if k.arg} if call else set()
        dotted = _dotted(node)
        if dotted and dotted.split(".")[0] in alias:
            head, _, rest = dotted.partition(".")
            full = alias[head] + ("." + rest if rest else "")
            if full != "torch":
                names.setdefault(full, set()).update(keywords)
        elif isinstance(node, ast.Attribute) and call is not None:
            methods.setdefault(node.attr, set()).update(keywords)
    for name, kind in alias.items():
        if kind != "torch" and name != "torch":
            names.setdefault(kind, set())
    return names, methods


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


# ----------------------------------------------------------------------------- a torch tree
class Tree:
    """The Python sources and stubs of one torch release, under its ``torch/`` folder."""

    def __init__(self, root: Path):
        self.root = root

    def module_files(self, dotted: str) -> list[Path]:
        base = self.root.joinpath(*dotted.split(".")[1:])
        return [
            p
            for p in (base.with_suffix(".py"), base.with_suffix(".pyi"), base / "__init__.py", base / "__init__.pyi")
            if p.is_file()
        ]

    @cache  # noqa: B019 - one checker per process: its cache lives as long as the script anyway
    def definitions(self, path: Path) -> dict[str, list]:
        """Module-level names of a file (in if/try blocks too): name -> [def/class nodes or None]."""
        found: dict[str, list] = {}
        stars = []

        def visit(body):
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    found.setdefault(node.name, []).append(node)
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                        for name in ast.walk(target):
                            if isinstance(name, ast.Name):
                                found.setdefault(name.id, []).append(None)
                elif isinstance(node, ast.Import):
                    for name in node.names:
                        found.setdefault(name.asname or name.name.split(".")[0], []).append(None)
                elif isinstance(node, ast.ImportFrom):
                    for name in node.names:
                        if name.name == "*":
                            stars.append(self._absolute(path, node))
                        else:
                            found.setdefault(name.asname or name.name, []).append(
                                ("from", self._absolute(path, node), name.name)
                            )
                for field in ("body", "orelse", "finalbody", "handlers"):
                    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        visit(getattr(node, field, []) or [])

        visit(ast.parse(path.read_text()).body)
        for module in stars:
            for file in self.module_files(module):
                for name, nodes in self.definitions(file).items():
                    found.setdefault(name, []).extend(nodes)
        return found

    def _absolute(self, path: Path, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = path.relative_to(self.root.parent).parts[:-1]  # a module's package, or __init__'s own
        package = package[: len(package) - node.level + 1]
        return ".".join([*package, *(node.module.split(".") if node.module else [])])

    def lookup(self, module: str, name: str, depth: int = 0) -> list:
        """The definitions of ``module.name``, following ``from x import name`` re-exports."""
        files = self.module_files(module)
        if module == "torch":
            files += [self.root / stub for stub in TOP_LEVEL_STUBS if (self.root / stub).is_file()]
        nodes = [node for file in files for node in self.definitions(file).get(name, [])]
        if self.module_files(f"{module}.{name}"):
            nodes.append(None)  # a submodule
        resolved = []
        for node in nodes:
            if isinstance(node, tuple) and depth < 6:
                _, source, original = node
                # A re-export from a module without sources here (a C extension, another package) is taken as is.
                resolved += self.lookup(source, original, depth + 1) or ([] if self.module_files(source) else [None])
            else:
                resolved.append(node)
        return resolved

    def mentions(self, module: str, word: str) -> bool:
        return any(word in file.read_text() for file in self.module_files(module))

    def config_names(self, module: str) -> set[str] | None:
        """The settings of a config module (``install_config_module``: ``patch(name=...)``), else None."""
        files = [f for f in self.module_files(module) if f.suffix == ".py"]
        if not files or "install_config_module" not in files[0].read_text():
            return None
        return set(self.definitions(files[0]))


def accepts(nodes: list, keywords: set[str]) -> bool:
    """Some definition among ``nodes`` takes every keyword (a class: its ``__init__``; None: unknown)."""
    if not keywords:
        return True
    for node in nodes:
        if isinstance(node, ast.ClassDef):
            inits = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name in ("__init__", "__new__")]
            if not inits:
                return True  # a dataclass or inherited constructor: not decidable here
            node = inits[0]
        if node is None:
            return True  # not a function (a C object, a module attribute): keywords not decidable here
        args = node.args
        if args.kwarg is not None or keywords <= {a.arg for a in args.args + args.kwonlyargs}:
            return True
    return False


def check(tree: Tree, names: dict[str, set], methods: dict[str, set], torch_module) -> list[str]:
    """Problems of the GPU path's uses in ``tree`` (empty: all resolve)."""
    problems = []
    for dotted, keywords in sorted(names.items()):
        parts = dotted.split(".")
        if tree.module_files(dotted):
            continue
        split = max(i for i in range(1, len(parts)) if tree.module_files(".".join(parts[:i])))
        module, name, rest = ".".join(parts[:split]), parts[split], parts[split + 1 :]
        nodes = tree.lookup(module, name)
        if not rest and name == "patch" and tree.config_names(module) is not None:
            missing = keywords - tree.config_names(module)
            if missing:
                problems.append(f"{dotted}: no setting {sorted(missing)} in {module}")
        elif not nodes:
            problems.append(f"{dotted}: {name} is not defined in {module}")
        elif rest and not tree.mentions(module, rest[-1]):
            problems.append(f"{dotted}: {rest[-1]} does not appear in {module}")
        elif not rest and not accepts(nodes, keywords):
            problems.append(f"{dotted}: takes none of the keyword(s) {sorted(keywords)}")
    for method, keywords in sorted(methods.items()):
        owners = [
            (file, cls) for owner, file, cls in INSTANCE_CLASSES if hasattr(_resolve(torch_module, owner), method)
        ]
        if not owners:
            continue  # not a method of a torch class (a dict's, a diffusers model's own)
        nodes = []
        for file, cls in owners:
            path = tree.root / file
            classes = (
                [n for n in tree.definitions(path).get(cls, []) if isinstance(n, ast.ClassDef)]
                if path.is_file()
                else []
            )
            for klass in classes:
                nodes += [
                    n for n in klass.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == method
                ]
                nodes += [
                    None
                    for n in klass.body
                    if isinstance(n, (ast.Assign, ast.AnnAssign))
                    and method in {t.id for t in ast.walk(n) if isinstance(t, ast.Name)}
                ]
        if not nodes:
            problems.append(f".{method}(): not defined on {', '.join(c for _, c in owners)}")
        elif not accepts(nodes, keywords):
            problems.append(f".{method}(): takes none of the keyword(s) {sorted(keywords)}")
    return problems


def _resolve(module, dotted: str):
    import importlib

    for part in dotted.split("."):
        module = (
            getattr(module, part) if hasattr(module, part) else importlib.import_module(f"{module.__name__}.{part}")
        )
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_torch", type=Path, help="the torch/ folder of the older release (sources and stubs)")
    args = parser.parse_args(argv)
    import torch

    names: dict[str, set] = {}
    methods: dict[str, set] = {}
    for file in GPU_PATH:
        found, called = uses(ROOT / file)
        for target, source in ((names, found), (methods, called)):
            for key, keywords in source.items():
                target.setdefault(key, set()).update(keywords)
    old_version = (args.old_torch / "version.py").read_text().split("__version__ = ")[1].split()[0].strip("'\"")
    status = 0
    for label, tree in (
        (f"installed torch {torch.__version__}", Tree(Path(torch.__file__).parent)),
        (f"torch {old_version} ({args.old_torch})", Tree(args.old_torch)),
    ):
        problems = check(tree, names, methods, torch)
        print(
            f"{label}: {len(names)} torch names, {sum(1 for m in methods if _owned(torch, m))} torch-class "
            f"methods of the GPU path; {len(problems)} problem(s)"
        )
        for problem in problems:
            print("  " + problem)
        status |= bool(problems)
    print("checked: " + ", ".join(sorted(names)))
    print("methods: " + ", ".join(sorted(m for m in methods if _owned(torch, m))))
    return status


def _owned(torch_module, method: str) -> bool:
    return any(hasattr(_resolve(torch_module, owner), method) for owner, _, _ in INSTANCE_CLASSES)


if __name__ == "__main__":
    sys.exit(main())
