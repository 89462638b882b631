"""The ``diffcut`` console script.

Each sub-command lives in its own module and exposes two functions:
``add_arguments(parser)`` declares its flags, ``run(args) -> int`` runs it.
Modules are imported only when their command is used, so ``diffcut evaluate``
does not pay for importing torch, diffusers or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "segment": ("diffcut.commands.segment", "segment image files; write label-map and overlay PNGs"),
    "label": ("diffcut.commands.label", "label a whole dataset with Ray Data; one Parquet label file per input unit"),
    "evaluate": ("diffcut.commands.evaluate", "score predicted label maps against ground truth (mIoU)"),
    "benchmark": ("diffcut.commands.benchmark", "run the paper's zero-shot benchmarks"),
    "rethreshold": ("diffcut.commands.rethreshold", "re-cut labels at a smaller tau from the stored split tree"),
    "discover": ("diffcut.commands.discover", "cluster segment descriptors into dataset-level classes (Ray Data)"),
    "export": ("diffcut.commands.export", "export labels as COCO JSON or PNG folders"),
    "gallery": ("diffcut.commands.gallery", "write a static HTML gallery of labeled images"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffcut", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
