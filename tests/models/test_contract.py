"""timm's model API on the Steps models beyond timm's own tests (test_timm_contract.py): grad checkpointing
that really checkpoints, layer-decay groups by step and block, per-step / per-stage features, pruning, and
the site cache of models/sites.py."""
import gc
import weakref
from collections import Counter

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn

import models  # noqa: F401  (registers the models)
from models import sites
from models.sites import SiteError, channel_dim, forward_paths, intervene, site_modules, site_names

MICRO = ["steps_deit_micro", "steps_swin_micro", "steps_resnet_micro"]


def micro(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs)
    torch.manual_seed(1)
    return model, torch.randn(2, *model.default_cfg["input_size"])


def train_step(model, x, checkpointing):
    """One forward + backward; how often each block ran, autograd's saved bytes, the output and gradients."""
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    calls = Counter()
    handles = [b.register_forward_pre_hook(lambda m, a, k=k: calls.update([k]))
               for k, b in enumerate(model.block_modules())]
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.square().mean().backward()
    for h in handles:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return set(calls.values()), saved[0], out.detach(), grads


@pytest.mark.parametrize("name", MICRO)
def test_grad_checkpointing_recomputes_every_block_and_changes_nothing(name):
    model, x = micro(name, drop_path_rate=0.0)
    model.train()
    runs, saved, out, grads = train_step(model, x, checkpointing=False)
    assert runs == {1}
    runs_ckpt, saved_ckpt, out_ckpt, grads_ckpt = train_step(model, x, checkpointing=True)
    assert runs_ckpt == {2}, "every block (transition blocks included) runs again in backward"
    assert saved_ckpt < 0.25 * saved, (saved_ckpt, saved)  # activations inside the blocks are not kept
    torch.testing.assert_close(out_ckpt, out)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], msg=n)
    assert train_step(model, x, checkpointing=False)[0] == {1}  # and it switches off again


def test_grad_checkpointing_keeps_site_edits_in_the_gradient():
    """An edit at a block output (a forward hook) is part of what backward differentiates, checkpointed or not."""
    model, x = micro("steps_deit_micro")
    model.train()
    grads = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        with intervene(model, {"blocks.5": lambda t: 0.5 * t}):
            model(x).square().mean().backward()
        grads.append(model.blocks.steps[0].blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("name", MICRO)
def test_layer_decay_groups_follow_steps_and_blocks(name):
    model, _ = micro(name)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    blocks = model.block_modules()
    block_scales = []
    for b in blocks:
        ss = {scale[id(p)] for p in b.parameters()}
        assert len(ss) == 1, "one group per block"
        block_scales += ss
    assert all(a < b for a, b in zip(block_scales, block_scales[1:])), "groups in execution order"
    first_conv = model.get_submodule(model.default_cfg["first_conv"])
    classifier = model.get_submodule(model.default_cfg["classifier"])
    assert scale[id(first_conv.weight)] < block_scales[0]
    assert scale[id(classifier.weight)] == 1.0 > block_scales[-1]
    assert len(set(scale.values())) == len(blocks) + 2  # stem, every block, head
    # coarse: one group per step (DeiT) or per stage (Swin, ResNet), plus stem and head
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    units = len(model.blocks.steps) if name.startswith("steps_deit") else len(model.steps_stacks())
    assert len(set(coarse.values())) == units + 2


def test_deit_layer_decay_group_names():
    model, _ = micro("steps_deit_micro")
    layer = timm.models.group_parameters(model, model.group_matcher(), reverse=True)
    assert layer["cls_token"] == layer["pos_embed"] == layer["patch_embed.proj.weight"] == 0
    assert layer["blocks.steps.0.blocks.0.attn.qkv.weight"] == 1
    assert layer["blocks.steps.0.blocks.3.mlp.fc2.bias"] == 4
    assert layer["blocks.steps.1.blocks.0.norm1.weight"] == 5
    assert layer["blocks.steps.2.blocks.3.mlp.fc2.weight"] == layer["norm.weight"] == 12
    assert layer["head.weight"] == 13


@pytest.mark.parametrize("name,channels,reductions", [
    ("steps_deit_micro", [64, 96, 128], [4, 4, 4]),   # per step: y_i at width C_i
    ("steps_swin_micro", [48, 96, 192], [2, 4, 8]),   # per stage
    ("steps_resnet_micro", [64, 32, 64, 128, 256], [2, 4, 8, 16, 32]),  # stem, then per stage
])
def test_features_only_feature_info(name, channels, reductions):
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True)
    assert model.feature_info.channels() == channels and model.feature_info.reduction() == reductions
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    outs = model.eval()(x)
    assert [o.shape[1] for o in outs] == channels
    assert [o.shape[-1] for o in outs] == [-(-28 // r) for r in reductions]
    torch.manual_seed(0)
    picked = timm.create_model(name, features_only=True, out_indices=(0, -1))
    assert picked.feature_info.channels() == [channels[0], channels[-1]]
    torch.testing.assert_close(picked.eval()(x)[1], outs[-1])


def test_deit_forward_intermediates_options():
    model, x = micro("steps_deit_micro")
    model.eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        ys = forward_paths(model, x, [f"stages.0.steps.{i}.y" for i in range(3)])
        assert [t.shape for t in inter] == [(2, 49, 64), (2, 49, 96), (2, 49, 128)]
        for i, t in enumerate(inter):
            torch.testing.assert_close(t, ys[f"stages.0.steps.{i}.y"][:, 1:])  # the step sites, no class token
        torch.testing.assert_close(final, model.forward_features(x))
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape for t in last2] == [(2, 96, 7, 7), (2, 128, 7, 7)]
        first = model.forward_intermediates(x, indices=[-3], intermediates_only=True)
        torch.testing.assert_close(first[0], inter[0].transpose(1, 2).reshape(2, 64, 7, 7))
        early, (y0,) = model.forward_intermediates(x, indices=[0], stop_early=True, output_fmt="NLC")
        assert early.shape == (2, 50, 64)  # y_1 with its class token, not normed (the norm is 128 wide)
        normed = model.forward_intermediates(x, indices=[2], norm=True, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(normed[0], final[:, 1:])
        with_prefix = model.forward_intermediates(x, indices=[1], return_prefix_tokens=True, output_fmt="NLC",
                                                  intermediates_only=True)
        assert with_prefix[0][1].shape == (2, 1, 96)
        out = model.forward_intermediates(x, output_dict=True, return_prefix_tokens=True)
        assert set(out) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
    with pytest.raises(ValueError, match="allowed: NCHW, NLC"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name,index,kept", [
    ("steps_deit_micro", 1, "stages.0.steps.1.y"), ("steps_swin_micro", 1, "stages.1.steps.1.y"),
    ("steps_resnet_micro", 2, "stages.1.steps.1.y")])
def test_prune_intermediate_layers_keeps_what_is_asked(name, index, kept):
    model, x = micro(name)
    model.eval()
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[index], intermediates_only=True)[0]
        names = site_names(model)
        assert model.prune_intermediate_layers([index]) == [index]
        got = model.forward_intermediates(x, indices=[index], intermediates_only=True)[0]
        torch.testing.assert_close(got, want)
        assert model.num_classes == 0 and model.num_features == want.shape[1]
        out = model(x)  # timm prunes the head and the pooling: the last kept step's / stage's features
        assert out.shape[channel_dim(model)] == want.shape[1]
        torch.testing.assert_close(out, model.forward_features(x))
    pruned = site_names(model)  # the site cache saw the dropped modules
    assert kept in pruned and len(pruned) < len(names) and set(pruned) <= set(names)


def test_deit_prune_keeps_all_steps_when_the_last_is_asked():
    model, x = micro("steps_deit_micro")
    model.eval()
    assert model.prune_intermediate_layers((0, 1, 2), prune_norm=True) == [0, 1, 2]
    assert len(model.blocks.steps) == 3 and isinstance(model.norm, nn.Identity)
    with pytest.raises(ValueError, match="allowed: 1..3"):
        model.blocks.truncate(4)


def test_micro_site_names_are_pinned():
    """Recorded runs use these names: they must not change."""
    model, _ = micro("steps_deit_micro")
    steps = ["stages.0.steps.0.x", "stages.0.steps.0.y"] + [
        f"stages.0.steps.{i}.{s}" for i in (1, 2) for s in ("y_prev", "x", "y")]
    assert site_names(model) == [f"blocks.{k}" for k in range(12)] + steps + [
        "final", "logits", "slow_path", "fast_path"]
    model, _ = micro("steps_resnet_micro")
    names = site_names(model)
    assert names[:15] == [f"blocks.{k}" for k in range(15)] and names[-4:] == [
        "final", "logits", "slow_path", "fast_path"]
    assert "stages.3.steps.1.y_prev" in names and "stages.3.steps.2.x" not in names
    assert site_names(timm.create_model("resnet_micro")) == [f"blocks.{k}" for k in range(12)] + ["final", "logits"]


def test_sites_are_resolved_once_per_model(monkeypatch):
    resolved = Counter()
    resolve = sites._resolve
    monkeypatch.setattr(sites, "_resolve", lambda m: resolved.update([id(m)]) or resolve(m))
    model, x = micro("steps_deit_micro")
    model.eval()
    with torch.no_grad():
        model.forward_paths(x, ["slow_path", "blocks.3"])
        forward_paths(model, x, ["final"], edits={"blocks.0": torch.zeros_like})
        with intervene(model, {}, capture=["logits"]) as store:
            model(x)
    site_names(model), site_modules(model)
    assert resolved[id(model)] == 1 and store["logits"].shape == (2, 5)
    # a swapped `step.blocks` (as the bench's wiring-only timing does) is seen
    step = model.blocks.steps[2]
    blocks, step.blocks = step.blocks, nn.Sequential()
    assert sum(n.startswith("blocks.") for n in site_names(model)) == 8
    step.blocks = blocks
    assert sum(n.startswith("blocks.") for n in site_names(model)) == 12
    assert resolved[id(model)] == 3


def test_sites_go_by_class_and_do_not_keep_models_alive():
    class LooksLikeAResNet(nn.Module):  # the old attribute test took any module with layer4 and fc for a ResNet
        def __init__(self):
            super().__init__()
            self.layer4, self.fc, self.blocks, self.norm = nn.Identity(), nn.Identity(), nn.Sequential(), nn.Identity()

    with pytest.raises(SiteError, match="has no known sites"):
        site_names(LooksLikeAResNet())
    assert channel_dim(LooksLikeAResNet()) == -1
    model, _ = micro("steps_resnet_micro")
    assert channel_dim(model) == 1 and site_modules(model)["logits"] is model
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
