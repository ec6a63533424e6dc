"""Short names for the timm baselines. The models are timm's own; nothing here reimplements them.

    deit_t / deit_s / deit_b     -> deit_{tiny,small,base}_patch16_224
    swin_t / swin_s / swin_b     -> swin_{tiny,small,base}_patch4_window7_224
    resnet18 / resnet34 / resnet50 are timm's names already.
CPU research baselines, matched in MACs to the `steps_*_micro` configs on 28 px grey images:
    deit_micro    ViT, width 128, 8 blocks, head dim 32, patch 4
    swin_micro    Swin, widths 48/96/192, depths (2, 2, 3), head dim 16, patch 2, window 7
    resnet_micro  ResNet, BasicBlocks, channels 32/64/128/256, depths (2, 3, 4, 3)
"""
from __future__ import annotations

import timm
from timm.models import register_model
from timm.models.resnet import BasicBlock
from torch import nn

_ALIASES = {
    "deit_t": "deit_tiny_patch16_224", "deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224",
    "swin_t": "swin_tiny_patch4_window7_224", "swin_s": "swin_small_patch4_window7_224",
    "swin_b": "swin_base_patch4_window7_224",
}
_MICRO = {
    "deit_micro": ("vit_tiny_patch16_224", dict(embed_dim=128, depth=8, num_heads=4, patch_size=4, img_size=28,
                                                in_chans=1)),
    "swin_micro": ("swin_tiny_patch4_window7_224", dict(embed_dim=48, depths=(2, 2, 3), num_heads=(3, 6, 12),
                                                        head_dim=16, patch_size=2, window_size=7, img_size=28,
                                                        in_chans=1)),
    "resnet_micro": ("resnet18", dict(block=BasicBlock, layers=(2, 3, 4, 3), channels=(32, 64, 128, 256),
                                      in_chans=1)),
}
_MICRO_CFG = dict(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,))


def _timm(name: str, pretrained: bool, **kwargs) -> nn.Module:
    if pretrained:
        raise ValueError(f"{name}: StepsLab runs offline; allowed: pretrained=False")
    return timm.create_model(name, pretrained=False, **kwargs)


def _micro(name: str, pretrained: bool, **kwargs) -> nn.Module:
    base, args = _MICRO[name]
    model = _timm(base, pretrained, **dict(args, **kwargs))
    model.pretrained_cfg = model.default_cfg = dict(model.pretrained_cfg, architecture=name, **_MICRO_CFG)
    return model


@register_model
def deit_t(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's DeiT-T (deit_tiny_patch16_224)."""
    return _timm(_ALIASES["deit_t"], pretrained, **kwargs)


@register_model
def deit_s(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's DeiT-S (deit_small_patch16_224)."""
    return _timm(_ALIASES["deit_s"], pretrained, **kwargs)


@register_model
def deit_b(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's DeiT-B (deit_base_patch16_224)."""
    return _timm(_ALIASES["deit_b"], pretrained, **kwargs)


@register_model
def swin_t(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's Swin-T (swin_tiny_patch4_window7_224)."""
    return _timm(_ALIASES["swin_t"], pretrained, **kwargs)


@register_model
def swin_s(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's Swin-S (swin_small_patch4_window7_224)."""
    return _timm(_ALIASES["swin_s"], pretrained, **kwargs)


@register_model
def swin_b(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's Swin-B (swin_base_patch4_window7_224)."""
    return _timm(_ALIASES["swin_b"], pretrained, **kwargs)


@register_model
def deit_micro(pretrained: bool = False, **kwargs) -> nn.Module:
    """CPU baseline for steps_deit_micro: timm ViT, width 128, 8 blocks."""
    return _micro("deit_micro", pretrained, **kwargs)


@register_model
def swin_micro(pretrained: bool = False, **kwargs) -> nn.Module:
    """CPU baseline for steps_swin_micro: timm Swin, 3 stages, depths (2, 2, 3)."""
    return _micro("swin_micro", pretrained, **kwargs)


@register_model
def resnet_micro(pretrained: bool = False, **kwargs) -> nn.Module:
    """CPU baseline for steps_resnet_micro: timm ResNet, channels 32..256, depths (2, 3, 4, 3)."""
    return _micro("resnet_micro", pretrained, **kwargs)
