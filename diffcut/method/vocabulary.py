"""Vocabularies for naming segments: class names with comma-separated synonyms, and the prompt templates.

The built-in class lists are those of the published DiffCut open-vocabulary
extension (``diffcut/data/vocabularies``); a FILE has one class per line. See
:mod:`diffcut.method.naming` for how they are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

#: The 14 ViLD prompt templates (Gu et al., 2022), as used by FC-CLIP and DiffCut's extension.
VILD_PROMPTS = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

#: Built-in vocabularies: the class lists (with synonyms) of the published extension.
#: ``voc``: PASCAL VOC 21 with FC-CLIP's prompt-engineered names (index 0 is "background"
#: with its many synonyms); ``context``: "background" + PASCAL Context 59; ``coco-object``:
#: "background" + the 80 COCO thing classes.
BUILTIN_VOCABULARIES = ("voc", "context", "coco-object")


# --------------------------------------------------------------------------- vocabularies
@dataclass(frozen=True)
class Vocabulary:
    """Class names; ``synonyms[i]`` are the comma-separated alternatives of class i."""

    name: str
    synonyms: tuple[tuple[str, ...], ...]

    @property
    def class_names(self) -> list[str]:
        """The first synonym of every class: the name written to the output."""
        return [names[0] for names in self.synonyms]

    def __len__(self) -> int:
        return len(self.synonyms)


def parse_vocabulary(text: str, name: str = "custom") -> Vocabulary:
    """One class per line, synonyms comma-separated; blank lines and ``#`` comments skipped."""
    classes = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        names = tuple(part.strip() for part in line.split(",") if part.strip())
        if names:
            classes.append(names)
    if not classes:
        raise ValueError(f"vocabulary {name!r} has no class names")
    return Vocabulary(name=name, synonyms=tuple(classes))


def load_vocabulary(spec: str) -> Vocabulary:
    """``voc``, ``context``, ``coco-object`` (built in) or a path to a vocabulary file."""
    if spec in BUILTIN_VOCABULARIES:
        text = resources.files("diffcut").joinpath("data", "vocabularies", f"{spec}.txt").read_text("utf-8")
        return parse_vocabulary(text, spec)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--vocabulary {spec!r} is neither one of {', '.join(BUILTIN_VOCABULARIES)} nor a file")
    return parse_vocabulary(path.read_text("utf-8"), str(path))
