"""The canonical label set and the folder-name variants that map onto it."""

from __future__ import annotations

import re

#: Canonical class names, in the order of the model's outputs.
CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "no_tumor", "pituitary")

_ALIASES = {
    "glioma": "glioma",
    "gliomas": "glioma",
    "meningioma": "meningioma",
    "meningiomas": "meningioma",
    "pituitary": "pituitary",
    "pituitary_adenoma": "pituitary",
    "no": "no_tumor",
    "notumor": "no_tumor",
    "no_tumor": "no_tumor",
    "none": "no_tumor",
    "normal": "no_tumor",
    "healthy": "no_tumor",
}

#: Published split folder names and the split each one means.
SPLIT_ALIASES = {
    "training": "train",
    "train": "train",
    "testing": "test",
    "test": "test",
    "validation": "val",
    "val": "val",
    "valid": "val",
}


def canonical_label(folder: str) -> str | None:
    """Map a class folder name to a canonical label, or None if it names no known class.

    Accepts the Sartaj dataset's names (``glioma_tumor``, ``no_tumor``...), the Kaggle
    "Brain Tumor MRI Dataset" names (``notumor``, ``glioma``...) and case/separator variants.
    """
    key = re.sub(r"[\s\-]+", "_", folder.strip().lower())
    key = re.sub(r"_?tumou?rs?$", "", key) or key
    if key in ("no", ""):
        return "no_tumor"
    return _ALIASES.get(key) or _ALIASES.get(key.replace("_", ""))


def canonical_split(folder: str) -> str | None:
    return SPLIT_ALIASES.get(folder.strip().lower())
