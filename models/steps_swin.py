"""Steps-Swin: timm's SwinTransformer with every stage's block stack run step by step.

Each stage keeps timm's patch merging (downsampling) and replaces its blocks by a `StepsStack` of ordinary
Swin blocks (window attention, head dim 32, W-MSA / SW-MSA alternating within each step). Stage widths
double as in Swin; step widths within a stage are `step_widths(stage_dim, num_steps, 32)`.

Configs (224 px, 1000 classes), per stage: (steps, blocks per step):
    steps_swin_t   C=96   (2: 1,1)  (3: 2,2,1)    (4: 4,4,4,3)  (4: 1,1,1,1)   26 blocks
    steps_swin_s   C=96   (2: 4,1)  (4: 2,2,2,1)  (2: 7,13)     (4: 1,3,1,1)   38 blocks
    steps_swin_b   C=128  (4: 1,2,2,1)  (4: 1,2,2,1)  (2: 7,13)  (4: 2,2,1,1)  38 blocks
    steps_swin_micro  C=48, 3 stages, patch 2, window 7, 28 px: (2: 2,1) (2: 2,1) (3: 2,2,2)
The paper gives only block counts and budgets; these allocations were chosen by a search for the paper's
block count with params and MACs within 1-3% of Table 1 (see `models/counting.py`, tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

from .sites import StepsPaths
from .steps import HookPoint, StepsStack, step_widths, width_multiple_error

__all__ = ["StepsSwin", "StepsSwinCfg"]


@dataclass(frozen=True)
class StepsSwinCfg:
    embed_dim: int
    stage_depths: tuple[tuple[int, ...], ...]  # blocks per step, per stage (steps per stage = len)
    head_dim: int = 32
    patch_size: int = 4
    window_size: int = 7
    img_size: int = 224


model_cfgs = {
    "steps_swin_t": StepsSwinCfg(96, ((1, 1), (2, 2, 1), (4, 4, 4, 3), (1, 1, 1, 1))),
    "steps_swin_s": StepsSwinCfg(96, ((4, 1), (2, 2, 2, 1), (7, 13), (1, 3, 1, 1))),
    "steps_swin_b": StepsSwinCfg(128, ((1, 2, 2, 1), (1, 2, 2, 1), (7, 13), (2, 2, 1, 1))),
    "steps_swin_micro": StepsSwinCfg(48, ((2, 1), (2, 1), (2, 2, 2)), head_dim=16, patch_size=2, window_size=7,
                                     img_size=28),
}


class StepsSwin(StepsPaths, SwinTransformer):
    """Swin whose stages run their blocks as `StepsStack`s. Sites: see `models.sites`.

    timm's model API works per stage as in Swin (`feature_info`, `forward_intermediates`,
    `prune_intermediate_layers` are SwinTransformer's); `group_matcher` groups parameters by stage, step and
    block; `set_grad_checkpointing` checkpoints every block.
    """

    def __init__(self, stage_depths: tuple[tuple[int, ...], ...], embed_dim: int = 96, head_dim: int = 32,
                 window_size: int = 7, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, **kwargs):
        dims = [embed_dim * 2 ** s for s in range(len(stage_depths))]
        for d in dims:
            if d % head_dim:
                raise ValueError(width_multiple_error(d, head_dim))
        stage_widths = [step_widths(d, len(depths), head_dim) for d, depths in zip(dims, stage_depths)]
        super().__init__(embed_dim=embed_dim, depths=tuple(1 for _ in stage_depths),
                         num_heads=tuple(d // head_dim for d in dims), head_dim=head_dim, window_size=window_size,
                         mlp_ratio=mlp_ratio, drop_path_rate=0.0, weight_init="skip", **kwargs)
        total = sum(sum(d) for d in stage_depths)
        drop_path = torch.linspace(0, drop_path_rate, total).tolist()
        offset = 0
        for stage, widths, depths in zip(self.layers, stage_widths, stage_depths):
            template = stage.blocks[0]  # timm resolved window size and resolution for this stage

            def make_block(width, index, position, template=template, offset=offset):
                window = template.window_size
                return SwinTransformerBlock(
                    dim=width, input_resolution=template.input_resolution, num_heads=width // head_dim,
                    head_dim=head_dim, window_size=window,
                    shift_size=0 if position % 2 == 0 else tuple(w // 2 for w in window),
                    always_partition=template.always_partition, dynamic_mask=template.dynamic_mask,
                    mlp_ratio=mlp_ratio, drop_path=drop_path[offset + index])

            stage.blocks = StepsStack(widths, depths, make_block, channel_dim=-1)
            offset += sum(depths)
        self.final = HookPoint()
        self.init_weights(needs_reset=False)

    def steps_stacks(self) -> list[StepsStack]:
        return [stage.blocks for stage in self.layers]

    def block_modules(self) -> list[nn.Module]:
        return [b for stage in self.layers for b in stage.blocks.block_modules()]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups (layer-wise LR decay): the stem, then one group per block in execution order (per
        stage if `coarse`); a stage's patch merging joins its first block and the final norm the last block,
        as in Swin; the head is left to timm (last group)."""
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+)\.downsample", (0, 0)),
            (r"^layers\.(\d+)\.blocks\.steps\.(\d+)\.blocks\.(\d+)", None),
            (r"^norm", (99999,)),
        ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every Steps block. The stages' own flag stays off: it checkpoints `nn.Sequential` blocks."""
        for stack in self.steps_stacks():
            stack.set_grad_checkpointing(enable)

    def set_input_size(self, *args, **kwargs):
        raise NotImplementedError("StepsSwin is built for one input size; pass img_size at creation")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(super().forward_features(x))


def _cfg(**kwargs) -> dict:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head.fc",
            "license": "mit", "paper_name": "Step by Step Network", "paper_ids": "arXiv:2511.14329", **kwargs}


# No weights are published: these are data configs and metadata only (timm's test_model_default_cfgs checks them).
default_cfgs = generate_default_cfgs({
    "steps_swin_t": _cfg(description="Steps-Swin-T, ImageNet 224 px"),
    "steps_swin_s": _cfg(description="Steps-Swin-S, ImageNet 224 px"),
    "steps_swin_b": _cfg(description="Steps-Swin-B, ImageNet 224 px"),
    "steps_swin_micro": _cfg(input_size=(1, 28, 28), pool_size=(4, 4), mean=(0.5,), std=(0.5,),
                             description="StepsLab CPU research config, 28 px grey images"),
})


def _create_steps_swin(variant: str, pretrained: bool = False, **kwargs) -> StepsSwin:
    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights exist; allowed: pretrained=False")
    cfg = model_cfgs[variant]
    args = dict(stage_depths=cfg.stage_depths, embed_dim=cfg.embed_dim, head_dim=cfg.head_dim,
                patch_size=cfg.patch_size, window_size=cfg.window_size, img_size=cfg.img_size)
    if variant.endswith("micro"):
        args["in_chans"] = 1
    args.update(kwargs)
    # features_only: every stage's output, through forward_intermediates (timm's default assumes 4 stages)
    out_indices = args.pop("out_indices", tuple(range(len(args["stage_depths"]))))
    return build_model_with_cfg(StepsSwin, variant, pretrained=False,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


@register_model
def steps_swin_t(pretrained: bool = False, **kwargs) -> StepsSwin:
    """Steps-Swin-T: 26 blocks at Swin-T's params and MACs."""
    return _create_steps_swin("steps_swin_t", pretrained, **kwargs)


@register_model
def steps_swin_s(pretrained: bool = False, **kwargs) -> StepsSwin:
    """Steps-Swin-S: 38 blocks at Swin-S's params and MACs."""
    return _create_steps_swin("steps_swin_s", pretrained, **kwargs)


@register_model
def steps_swin_b(pretrained: bool = False, **kwargs) -> StepsSwin:
    """Steps-Swin-B: 38 blocks at Swin-B's params and MACs."""
    return _create_steps_swin("steps_swin_b", pretrained, **kwargs)


@register_model
def steps_swin_micro(pretrained: bool = False, **kwargs) -> StepsSwin:
    """CPU research config: 3 stages (48/96/192 wide), 12 blocks, patch 2 on 28 px grey images."""
    return _create_steps_swin("steps_swin_micro", pretrained, **kwargs)
