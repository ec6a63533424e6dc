"""Steps-ResNet: timm's ResNet with every stage's residual blocks run step by step.

Each stage keeps timm's first block at full width (it changes resolution and width, so it cannot be split)
and runs the remaining budget as a `StepsStack` of ordinary BasicBlocks / Bottlenecks at widths C_i (for a
Bottleneck, C_i is the block's output width and its inner width is C_i / 4).
Step widths are `step_widths(C, n, 16)` for BasicBlocks and `step_widths(C, n, 64)` for Bottlenecks.

Configs (224 px, 1000 classes), per stage: blocks per step after the transition block:
    steps_resnet18   (1,1) (1,1) (1,1) (1,1)  2 steps, widths (C/2, C)          12 blocks
    steps_resnet34   (2,1,1,1) (2,2,2,1) (4,4,4,2) (1,1,1,1)  4 steps             34 blocks
    steps_resnet50   (1,1,1,1) (3,3,1,1) (4,4,4,2) (1,1,1,1)  4 steps             34 blocks
    steps_resnet_micro  channels 32/64/128/256, (1,1) (1,1) (2,2) (2,1), 28 px grey
ResNet-18 has a single block after each transition; any Steps stack costs at least one full-width block
plus its narrower steps, so Steps-ResNet-18 uses a cheap 2-step split (C/2 then C) and runs over budget
(the paper's row for it is unreadable in our copy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from .sites import StepsPaths
from .steps import HookPoint, StepsStack, check_step_widths, step_widths

__all__ = ["StepsResNet", "StepsResNetCfg"]


@dataclass(frozen=True)
class StepsResNetCfg:
    block: str  # "basic" | "bottleneck"
    stage_depths: tuple[tuple[int, ...], ...]  # blocks per step after each stage's transition block
    stage_widths: Optional[tuple[tuple[int, ...], ...]] = None  # explicit widths; default: narrow-to-wide schedule
    channels: tuple[int, ...] = (64, 128, 256, 512)
    in_chans: int = 3


model_cfgs = {
    "steps_resnet18": StepsResNetCfg("basic", ((1, 1),) * 4,
                                     stage_widths=((32, 64), (64, 128), (128, 256), (256, 512))),
    "steps_resnet34": StepsResNetCfg("basic", ((2, 1, 1, 1), (2, 2, 2, 1), (4, 4, 4, 2), (1, 1, 1, 1))),
    "steps_resnet50": StepsResNetCfg("bottleneck", ((1, 1, 1, 1), (3, 3, 1, 1), (4, 4, 4, 2), (1, 1, 1, 1))),
    "steps_resnet_micro": StepsResNetCfg("basic", ((1, 1), (1, 1), (2, 2), (2, 1)), channels=(32, 64, 128, 256),
                                         in_chans=1),
}
_BLOCKS = {"basic": (BasicBlock, 16), "bottleneck": (Bottleneck, 64)}


class StepsResNet(StepsPaths, ResNet):
    """ResNet whose stages run a transition block, then a `StepsStack`. Sites: see `models.sites`."""

    def __init__(self, block: str, stage_depths: tuple[tuple[int, ...], ...],
                 stage_widths: Optional[tuple[tuple[int, ...], ...]] = None,
                 channels: tuple[int, ...] = (64, 128, 256, 512), drop_path_rate: float = 0.0, **kwargs):
        if block not in _BLOCKS:
            raise ValueError(f"block {block!r}; allowed: {', '.join(_BLOCKS)}")
        block_cls, multiple = _BLOCKS[block]
        super().__init__(block=block_cls, layers=(1,) * len(stage_depths), channels=channels, **kwargs)
        total = len(stage_depths) + sum(sum(d) for d in stage_depths)
        rates = torch.linspace(0, drop_path_rate, total).tolist()
        index = 0
        for s, depths in enumerate(stage_depths):
            layer = getattr(self, f"layer{s + 1}")
            transition = layer[0]
            transition.drop_path = DropPath(rates[index]) if rates[index] > 0 else None
            width = channels[s] * block_cls.expansion
            widths = (check_step_widths(stage_widths[s], width, multiple) if stage_widths
                      else step_widths(width, len(depths), multiple))

            def make_block(w, i, position, offset=index + 1):
                rate = rates[offset + i]
                return block_cls(w, w // block_cls.expansion, drop_path=DropPath(rate) if rate > 0 else None)

            setattr(self, f"layer{s + 1}", nn.Sequential(transition, StepsStack(widths, depths, make_block, 1)))
            index += 1 + sum(depths)
        self.final = HookPoint()
        self.init_weights(zero_init_last=True)

    def steps_stacks(self) -> list[StepsStack]:
        return [getattr(self, f"layer{s}")[1] for s in range(1, 5)]

    def block_modules(self) -> list[nn.Module]:
        blocks = []
        for s in range(1, 5):
            transition, stack = getattr(self, f"layer{s}")
            blocks += [transition] + stack.block_modules()
        return blocks

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(super().forward_features(x))


def _cfg(**kwargs) -> dict:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "conv1", "classifier": "fc", "license": "mit", **kwargs}


default_cfgs = generate_default_cfgs({
    "steps_resnet18": _cfg(),
    "steps_resnet34": _cfg(),
    "steps_resnet50": _cfg(),
    "steps_resnet_micro": _cfg(input_size=(1, 28, 28), pool_size=(1, 1), mean=(0.5,), std=(0.5,)),
})


def _create_steps_resnet(variant: str, pretrained: bool = False, **kwargs) -> StepsResNet:
    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights exist; allowed: pretrained=False")
    cfg = model_cfgs[variant]
    args = dict(block=cfg.block, stage_depths=cfg.stage_depths, stage_widths=cfg.stage_widths,
                channels=cfg.channels, in_chans=cfg.in_chans)
    return build_model_with_cfg(StepsResNet, variant, pretrained=False, feature_cfg=dict(feature_cls="getter"),
                                **dict(args, **kwargs))


@register_model
def steps_resnet18(pretrained: bool = False, **kwargs) -> StepsResNet:
    """Steps-ResNet-18: every stage's second block split into 2 steps (C/2, C)."""
    return _create_steps_resnet("steps_resnet18", pretrained, **kwargs)


@register_model
def steps_resnet34(pretrained: bool = False, **kwargs) -> StepsResNet:
    """Steps-ResNet-34: 34 basic blocks (4 steps per stage) at ResNet-34's params and MACs."""
    return _create_steps_resnet("steps_resnet34", pretrained, **kwargs)


@register_model
def steps_resnet50(pretrained: bool = False, **kwargs) -> StepsResNet:
    """Steps-ResNet-50: 34 bottlenecks (4 steps per stage) at ResNet-50's params and MACs."""
    return _create_steps_resnet("steps_resnet50", pretrained, **kwargs)


@register_model
def steps_resnet_micro(pretrained: bool = False, **kwargs) -> StepsResNet:
    """CPU research config: channels 32..256, 2 steps per stage, 28 px grey images."""
    return _create_steps_resnet("steps_resnet_micro", pretrained, **kwargs)
