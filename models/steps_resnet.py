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
from typing import Optional, Union

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # timm exports it from no public module
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
    """ResNet whose stages run a transition block, then a `StepsStack`. Sites: see `models.sites`.

    timm's model API works per stage as in ResNet (`feature_info`: the stem and the 4 stages); `group_matcher`
    groups parameters by stage, step and block; `set_grad_checkpointing` checkpoints every block.
    """

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

    def _layers(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def steps_stacks(self) -> list[StepsStack]:
        return [m for layer in self._layers() for m in layer if isinstance(m, StepsStack)]

    def block_modules(self) -> list[nn.Module]:
        return [b for layer in self._layers() for m in layer
                for b in (m.block_modules() if isinstance(m, StepsStack) else [m])]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups (layer-wise LR decay): the stem, then one group per block in execution order (a
        stage's transition block, then its steps' blocks; per stage if `coarse`); the head is left to timm."""
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else [
            (r"^layer(\d+)\.0\.", (0,)),
            (r"^layer(\d+)\.1\.steps\.(\d+)\.blocks\.(\d+)", None),
        ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block: the transition blocks here, the Steps blocks inside their stacks."""
        self.grad_checkpointing = enable
        for stack in self.steps_stacks():
            stack.set_grad_checkpointing(enable)

    def _run_layer(self, layer: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not self.grad_checkpointing or torch.jit.is_scripting():
            return layer(x)
        # ResNet's checkpoint_seq would checkpoint a whole StepsStack as one segment (and again per block
        # inside it); checkpoint only the transition block here and let the stack checkpoint its blocks.
        for m in layer:
            x = m(x) if isinstance(m, StepsStack) else checkpoint(m, x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for layer in self._layers():
            x = self._run_layer(layer, x)
        return self.final(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """ResNet's: the stem activation and the 4 stage outputs (`feature_info`), with the stages run as in
        `forward_features`. `norm` has no effect (ResNet has no final norm)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r}; allowed: NCHW")
        take_indices, max_index = feature_take_indices(5, indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        layers = self._layers()[:max_index] if stop_early else self._layers()
        for i, layer in enumerate(layers, start=1):
            x = self._run_layer(layer, x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return (self.final(x) if len(layers) == 4 else x), intermediates


def _cfg(**kwargs) -> dict:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
            "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "conv1", "classifier": "fc", "license": "mit", "paper_name": "Step by Step Network",
            "paper_ids": "arXiv:2511.14329", **kwargs}


# No weights are published: these are data configs and metadata only (timm's test_model_default_cfgs checks them).
default_cfgs = generate_default_cfgs({
    "steps_resnet18": _cfg(description="Steps-ResNet-18, ImageNet 224 px"),
    "steps_resnet34": _cfg(description="Steps-ResNet-34, ImageNet 224 px"),
    "steps_resnet50": _cfg(description="Steps-ResNet-50, ImageNet 224 px"),
    "steps_resnet_micro": _cfg(input_size=(1, 28, 28), pool_size=(1, 1), mean=(0.5,), std=(0.5,),
                               description="StepsLab CPU research config, 28 px grey images"),
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
