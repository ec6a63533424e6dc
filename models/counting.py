"""Params, MACs and the paper's layer count for every model, beside the paper's Table 1.

MACs come from `torch.utils.flop_counter` (2 FLOPs per MAC). Its CPU counter does not see fused
`scaled_dot_product_attention`, so attention is counted through timm's unfused path: the published
DeiT/Swin/ResNet figures are reproduced that way (shared/paper-facts.md).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import BASELINE_OF, create_model, family_of, is_steps
from .sites import site_modules

__all__ = ["PAPER", "ModelCount", "count_model", "count_params", "count_macs", "paper_layers"]

# name -> (blocks, layers, params in M, MACs in G) from the paper's Table 1 (None where unreadable).
PAPER: dict[str, tuple[Optional[int], Optional[int], Optional[float], Optional[float]]] = {
    "resnet18": (8, 18, 11.7, 1.8), "steps_resnet18": (None, 36, None, None),
    "resnet34": (16, 34, 21.8, 3.6), "steps_resnet34": (None, 70, 21.8, 3.7),
    "resnet50": (16, 50, 25.6, 4.1), "steps_resnet50": (34, 104, 25.6, 4.1),
    "deit_t": (12, 62, 5.7, 1.3), "steps_deit_t": (24, 122, None, None),
    "deit_s": (12, 62, 22.1, 4.6), "steps_deit_s": (24, 122, 22.1, 4.7),
    "deit_b": (12, 62, 86.6, 17.6), "steps_deit_b": (24, 122, 86.7, 17.9),
    "swin_t": (12, 65, 28.3, 4.5), "steps_swin_t": (26, None, 27.8, 4.5),
    "swin_s": (24, None, 49.6, 8.7), "steps_swin_s": (38, 195, 49.1, 8.8),
    "swin_b": (24, None, 87.8, 15.4), "steps_swin_b": (38, 195, 86.7, 15.5),
}


@dataclass
class ModelCount:
    name: str
    steps: Optional[list[int]]         # steps per stage (None for baselines)
    widths: Optional[list[list[int]]]  # cumulative step widths per stage
    depths: list                       # blocks per step per stage (Steps) or per stage (baselines)
    blocks: int
    layers: int
    params_m: float
    gmacs: float
    paper_blocks: Optional[int] = None
    paper_layers: Optional[int] = None
    paper_params_m: Optional[float] = None
    paper_gmacs: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _unfused_attention(model: nn.Module) -> Iterator[None]:
    mods = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    for m in mods:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in mods:
            m.fused_attn = True


def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on a batch of one image of `input_size` (C, H, W)."""
    x = torch.zeros(1, *input_size)
    with torch.no_grad(), _unfused_attention(model), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops() // 2


def paper_layers(model: nn.Module, name: str) -> int:
    """Layers as the paper counts them: every conv or linear layer is one (a Transformer block is 5)."""
    blocks = [m for n, m in site_modules(model).items() if n.startswith("blocks.")]
    family = family_of(name)
    if family == "resnet":
        per_block = sum(1 for n, _ in blocks[0].named_children() if n.startswith("conv"))
        return per_block * len(blocks) + 2  # + stem conv + classifier
    merges = len(model.layers) - 1 if family == "swin" else 0
    return 5 * len(blocks) + 2 + merges  # + patch embedding + classifier (+ Swin's patch merging)


def count_model(name: str, input_size: tuple[int, ...] = (3, 224, 224), num_classes: int = 1000,
                **kwargs) -> ModelCount:
    """Build `name` and count it; at 224 px / 1000 classes the paper's numbers are filled in beside ours."""
    kwargs.setdefault("in_chans", input_size[0])
    if "micro" not in name:
        kwargs.setdefault("img_size", input_size[-1]) if family_of(name) != "resnet" else None
    model = create_model(name, num_classes=num_classes, **kwargs)
    blocks = sum(1 for n in site_modules(model) if n.startswith("blocks."))
    if is_steps(name):
        steps, widths, depths = [len(w) for w in model.step_widths], model.step_widths, model.step_depths
    else:
        steps, widths = None, None
        depths = [len(getattr(model, f"layer{s}")) for s in range(1, 5)] if family_of(name) == "resnet" else (
            [len(stage.blocks) for stage in model.layers] if family_of(name) == "swin" else [len(model.blocks)])
    count = ModelCount(name, steps, widths, depths, blocks, paper_layers(model, name),
                       round(count_params(model) / 1e6, 2), round(count_macs(model, input_size) / 1e9, 3))
    if input_size[-1] == 224 and num_classes == 1000 and name in PAPER:
        count.paper_blocks, count.paper_layers, count.paper_params_m, count.paper_gmacs = PAPER[name]
    return count


def paper_models() -> list[str]:
    """Every full-size model with a row in the paper's table, Steps model after its baseline."""
    return [n for s, b in BASELINE_OF.items() if "micro" not in s for n in (b, s)]
