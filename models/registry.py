"""The model names StepsLab knows, their pairing with baselines, and `create_model` with a clear error."""
from __future__ import annotations

import timm
from torch import nn

from .errors import UserError

# Steps model -> its baseline at matched params / MACs.
BASELINE_OF = {
    "steps_deit_t": "deit_t", "steps_deit_s": "deit_s", "steps_deit_b": "deit_b",
    "steps_swin_t": "swin_t", "steps_swin_s": "swin_s", "steps_swin_b": "swin_b",
    "steps_resnet18": "resnet18", "steps_resnet34": "resnet34", "steps_resnet50": "resnet50",
    "steps_deit_micro": "deit_micro", "steps_swin_micro": "swin_micro", "steps_resnet_micro": "resnet_micro",
}
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
