"""Steps-DeiT: timm's VisionTransformer with its block stack run step by step.

Tokens after patch embedding, class token and position embedding (width C) are split along channels; step i
runs ordinary DeiT blocks at width C_i with C_i / head_dim heads. Everything else (stem, final norm, class
token pooling, head) is timm's VisionTransformer.

Configs (224 px, 1000 classes; head dim 64 as in DeiT):
    steps_deit_t      widths (64, 128, 192)        depths (8, 8, 8)      24 blocks
    steps_deit_s      widths (128, 192, 256, 384)  depths (5, 5, 7, 7)   24 blocks
    steps_deit_b      widths (256, 384, 512, 768)  depths (5, 5, 7, 7)   24 blocks
    steps_deit_micro  widths (64, 96, 128)         depths (4, 4, 4)      12 blocks, head dim 32, patch 4, 28 px
S/B widths are `step_widths(C, 4, 64)`; equal depths (6, 6, 6, 6) would undershoot the paper's params by 10%
because rounding to whole heads makes the narrow steps narrower than C/sqrt(2)^k, so the deeper, wider
steps get one block more. T has 3 heads, so 3 steps of one more head each.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .sites import StepsPaths
from .steps import HookPoint, StepsStack, check_step_widths, width_multiple_error

__all__ = ["StepsDeiT", "StepsDeiTCfg"]


@dataclass(frozen=True)
class StepsDeiTCfg:
    step_widths: tuple[int, ...]
    step_depths: tuple[int, ...]
    head_dim: int = 64
    patch_size: int = 16
    img_size: int = 224
    mlp_ratio: float = 4.0


model_cfgs = {
    "steps_deit_t": StepsDeiTCfg((64, 128, 192), (8, 8, 8)),
    "steps_deit_s": StepsDeiTCfg((128, 192, 256, 384), (5, 5, 7, 7)),
    "steps_deit_b": StepsDeiTCfg((256, 384, 512, 768), (5, 5, 7, 7)),
    "steps_deit_micro": StepsDeiTCfg((64, 96, 128), (4, 4, 4), head_dim=32, patch_size=4, img_size=28),
}


class StepsDeiT(StepsPaths, VisionTransformer):
    """DeiT whose transformer blocks run as a `StepsStack`. Sites: see `models.sites`."""

    def __init__(self, step_widths: tuple[int, ...], step_depths: tuple[int, ...], head_dim: int = 64,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, **kwargs):
        embed_dim = int(step_widths[-1])
        if embed_dim % head_dim:
            raise ValueError(width_multiple_error(embed_dim, head_dim))
        check_step_widths(step_widths, embed_dim, head_dim)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        kwargs.setdefault("class_token", True)
        super().__init__(embed_dim=embed_dim, depth=0, num_heads=embed_dim // head_dim, mlp_ratio=mlp_ratio,
                         norm_layer=norm_layer, weight_init="skip", **kwargs)
        total = sum(step_depths)
        drop_path = torch.linspace(0, drop_path_rate, total).tolist()  # stochastic depth grows with depth

        def make_block(width: int, index: int, position: int) -> nn.Module:
            return Block(dim=width, num_heads=width // head_dim, mlp_ratio=mlp_ratio, qkv_bias=True,
                         drop_path=drop_path[index], norm_layer=norm_layer)

        self.blocks = StepsStack(step_widths, step_depths, make_block, channel_dim=-1)
        self.final = HookPoint()
        reduction = self.patch_embed.feature_info(0)["reduction"] if hasattr(self.patch_embed, "feature_info") \
            else self.patch_embed.patch_size[0]
        self.feature_info = [dict(module=f"blocks.steps.{i}", num_chs=w, reduction=reduction)
                             for i, w in enumerate(self.blocks.widths)]
        self.weight_init_mode = ""
        self.init_weights(needs_reset=False)

    def steps_stacks(self) -> list[StepsStack]:
        return [self.blocks]

    def block_modules(self) -> list[nn.Module]:
        return self.blocks.block_modules()

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("StepsDeiT does not take attention masks")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return self.final(self.norm(self.blocks(x)))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[int | list[int]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, **kwargs):
        """Step outputs y_i (patch tokens, without prefix tokens) as intermediates, timm style.

        `indices`: which steps (an int n takes the last n). Widths differ per step (C_i), so `norm` applies
        the final norm only to the last step's output.
        """
        n = len(self.blocks.steps)
        take = list(range(n - indices, n)) if isinstance(indices, int) else list(indices or range(n))
        if any(not 0 <= i < n for i in take):
            raise ValueError(f"indices {take}: allowed step indices 0..{n - 1}")
        tokens = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        stack, y, start, outs = self.blocks, None, 0, []
        last = max(take) if stop_early else n - 1
        for i, (step, width) in enumerate(zip(stack.steps[:last + 1], stack.widths)):
            y = step(y, tokens.narrow(-1, start, width - start))
            start = width
            if i in take:
                out = self.norm(y) if norm and i == n - 1 else y
                out = out[:, self.num_prefix_tokens:]
                if output_fmt == "NCHW":
                    h, w = self.patch_embed.dynamic_feat_size(x.shape[-2:]) if hasattr(
                        self.patch_embed, "dynamic_feat_size") else self.patch_embed.grid_size
                    out = out.reshape(out.shape[0], h, w, -1).permute(0, 3, 1, 2)
                outs.append(out)
        if intermediates_only:
            return outs
        if last < n - 1:
            return None, outs
        return self.final(self.norm(y)), outs


def _cfg(**kwargs) -> dict:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "mit", **kwargs}


default_cfgs = generate_default_cfgs({
    "steps_deit_t": _cfg(),
    "steps_deit_s": _cfg(),
    "steps_deit_b": _cfg(),
    "steps_deit_micro": _cfg(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,)),
})


def _create_steps_deit(variant: str, pretrained: bool = False, **kwargs) -> StepsDeiT:
    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights exist; allowed: pretrained=False")
    cfg = model_cfgs[variant]
    args = dict(step_widths=cfg.step_widths, step_depths=cfg.step_depths, head_dim=cfg.head_dim,
                patch_size=cfg.patch_size, img_size=cfg.img_size, mlp_ratio=cfg.mlp_ratio)
    if variant.endswith("micro"):
        args["in_chans"] = 1
    return build_model_with_cfg(StepsDeiT, variant, pretrained=False, feature_cfg=dict(out_indices=len(
        cfg.step_widths) - 1, feature_cls="getter"), **dict(args, **kwargs))


@register_model
def steps_deit_t(pretrained: bool = False, **kwargs) -> StepsDeiT:
    """Steps-DeiT-T: 3 steps x 8 blocks, widths 64/128/192."""
    return _create_steps_deit("steps_deit_t", pretrained, **kwargs)


@register_model
def steps_deit_s(pretrained: bool = False, **kwargs) -> StepsDeiT:
    """Steps-DeiT-S: 4 steps (5/5/7/7 blocks), widths 128/192/256/384."""
    return _create_steps_deit("steps_deit_s", pretrained, **kwargs)


@register_model
def steps_deit_b(pretrained: bool = False, **kwargs) -> StepsDeiT:
    """Steps-DeiT-B: 4 steps (5/5/7/7 blocks), widths 256/384/512/768."""
    return _create_steps_deit("steps_deit_b", pretrained, **kwargs)


@register_model
def steps_deit_micro(pretrained: bool = False, **kwargs) -> StepsDeiT:
    """CPU research config: 3 steps x 4 blocks, widths 64/96/128, patch 4 on 28 px grey images."""
    return _create_steps_deit("steps_deit_micro", pretrained, **kwargs)
