"""The model names StepsLab knows, their pairing with baselines, and `create_model` with a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import timm
from torch import nn

from .errors import UserError

# Steps model -> its baseline at matched params / MACs. Kept as data in names.json so that the CLI can refuse a
# mistyped model name before it imports torch (experiments.options reads the same file).
BASELINE_OF: dict[str, str] = json.loads(Path(__file__).with_name("names.json").read_text())
MODELS: tuple[str, ...] = tuple(BASELINE_OF) + tuple(BASELINE_OF.values())


class UnknownModelError(UserError):
    """A model name StepsLab does not know."""


def family_of(name: str) -> str:
    """'deit', 'swin' or 'resnet'."""
    check_name(name)
    return next(f for f in ("deit", "swin", "resnet") if f in name)


def is_steps(name: str) -> bool:
    return check_name(name).startswith("steps_")


def check_name(name: str) -> str:
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    return name


def create_model(name: str, **kwargs) -> nn.Module:
    """`timm.create_model` for a StepsLab name, with a one-line error for unknown names."""
    return timm.create_model(check_name(name), **kwargs)
