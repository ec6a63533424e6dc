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
from typing import Optional, Union

import torch
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models._features import feature_take_indices  # timm exports it from no public module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

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
    """DeiT whose transformer blocks run as a `StepsStack`. Sites: see `models.sites`.

    timm's model API works per step: `feature_info`, `forward_intermediates` and `prune_intermediate_layers`
    index the steps (outputs y_i, widths C_i); `group_matcher` groups parameters by step and block;
    `set_grad_checkpointing` checkpoints every block.
    """

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
        reduction = self.patch_embed.feat_ratio() if hasattr(self.patch_embed, "feat_ratio") \
            else max(self.patch_embed.patch_size)
        self.feature_info = [dict(module=f"blocks.steps.{i}", num_chs=w, reduction=reduction)
                             for i, w in enumerate(self.blocks.widths)]
        self.weight_init_mode = ""
        self.init_weights(needs_reset=False)

    def steps_stacks(self) -> list[StepsStack]:
        return [self.blocks]

    def block_modules(self) -> list[nn.Module]:
        return self.blocks.block_modules()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups (layer-wise LR decay): the stem, then one group per block in execution order (per
        step if `coarse`), the final norm with the last block; the head is left to timm (last group)."""
        blocks = r"^blocks\.steps\.(\d+)" if coarse else r"^blocks\.steps\.(\d+)\.blocks\.(\d+)"
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(blocks, None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every Steps block (VisionTransformer's own flag only covers `nn.Sequential` blocks)."""
        super().set_grad_checkpointing(enable)
        self.blocks.set_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("StepsDeiT does not take attention masks; allowed: attn_mask=None, is_causal=False")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return self.final(self.norm(self.blocks(x)))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              output_dict: bool = False, attn_mask: Optional[torch.Tensor] = None,
                              is_causal: bool = False):
        """Step outputs y_i as intermediates, with VisionTransformer's arguments and return values.

        `indices` picks steps (an int n: the last n; negative indices count from the end). Step widths differ
        (C_i), so `norm` applies the final norm to the last step's output only, and with `stop_early` before
        the last step the final features are that step's output, not normed (as Swin does for its stages).
        """
        if attn_mask is not None or is_causal:
            raise ValueError("StepsDeiT does not take attention masks; allowed: attn_mask=None, is_causal=False")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt {output_fmt!r}; allowed: NCHW, NLC")
        num_steps = len(self.blocks.steps)
        take_indices, max_index = feature_take_indices(num_steps, indices)
        batch, _, height, width = x.shape
        tokens = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        ys = self.blocks.step_outputs(tokens, stop=max_index if stop_early else None)

        intermediates = [self.norm(ys[i]) if norm and i == num_steps - 1 else ys[i] for i in take_indices]
        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates] if self.num_prefix_tokens else None
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            h, w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]

        def final() -> torch.Tensor:
            return self.final(self.norm(ys[-1])) if len(ys) == num_steps else ys[-1]

        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                out["image_features"] = final()
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return final(), intermediates

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the steps after the last of `indices` (timm's contract; returns the absolute step indices).

        The final norm and the head are sized for the full width, so they go when steps are dropped.
        """
        num_steps = len(self.blocks.steps)
        take_indices, max_index = feature_take_indices(num_steps, indices)
        prune_end = max_index < num_steps - 1
        self.blocks.truncate(max_index + 1)
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.blocks.widths[-1]
        if prune_head or prune_end:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices


def _cfg(**kwargs) -> dict:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "mit", "paper_name": "Step by Step Network", "paper_ids": "arXiv:2511.14329", **kwargs}


# No weights are published: these are data configs and metadata only (timm's test_model_default_cfgs checks them).
default_cfgs = generate_default_cfgs({
    "steps_deit_t": _cfg(description="Steps-DeiT-T, ImageNet 224 px"),
    "steps_deit_s": _cfg(description="Steps-DeiT-S, ImageNet 224 px"),
    "steps_deit_b": _cfg(description="Steps-DeiT-B, ImageNet 224 px"),
    "steps_deit_micro": _cfg(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,),
                             description="StepsLab CPU research config, 28 px grey images"),
})


def _create_steps_deit(variant: str, pretrained: bool = False, **kwargs) -> StepsDeiT:
    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights exist; allowed: pretrained=False")
    cfg = model_cfgs[variant]
    args = dict(step_widths=cfg.step_widths, step_depths=cfg.step_depths, head_dim=cfg.head_dim,
                patch_size=cfg.patch_size, img_size=cfg.img_size, mlp_ratio=cfg.mlp_ratio)
    if variant.endswith("micro"):
        args["in_chans"] = 1
    args.update(kwargs)
    # features_only: every step's output y_i, through forward_intermediates
    out_indices = args.pop("out_indices", tuple(range(len(args["step_widths"]))))
    return build_model_with_cfg(StepsDeiT, variant, pretrained=False,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


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
