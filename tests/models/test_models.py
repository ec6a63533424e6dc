"""Every registered model: timm API, gradients, state_dict, sites and interventions, the paper's table."""
import json

import pytest
import timm
import torch
from click.testing import CliRunner

import models
from models.counting import count_model, paper_models
from models.registry import MODELS, UnknownModelError, create_model, is_steps
from models.sites import SiteError, ablate_channels, forward_paths, intervene, site_names

SMALL = {"deit": dict(img_size=32), "swin": dict(img_size=64), "resnet": {}}


def small(name, **kwargs):
    """A model at a small input (micro configs keep their own 28 px grey input)."""
    if "micro" not in name:
        kwargs.update(SMALL[models.family_of(name)])
    model = create_model(name, num_classes=5, **kwargs)
    side = kwargs.get("img_size", 32)
    size = model.default_cfg["input_size"] if "micro" in name else (3, side, side)
    return model, torch.randn(2, *size)


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model, x = small(name, drop_path_rate=0.1)
    out = model(x)
    assert out.shape == (2, 5)
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert model.default_cfg["architecture"] == name or "micro" in name or not is_steps(name)


@pytest.mark.parametrize("name", [n for n in MODELS if "micro" in n] + ["steps_deit_s", "steps_resnet50"])
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    a, x = small(name)
    torch.manual_seed(1)
    b, _ = small(name)
    a.eval(), b.eval()
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("name", [n for n in MODELS if is_steps(n)])
def test_path_features_have_the_documented_widths(name):
    model, x = small(name)
    model.eval()
    out = model.forward_paths(x, ["final", "slow_path", "fast_path", "logits"])
    dim = models.sites.channel_dim(model)
    widths = model.step_widths[-1]
    assert out["slow_path"].shape[dim] == widths[-2] == model.slow_width
    assert out["fast_path"].shape[dim] == widths[-1] - widths[-2]
    torch.testing.assert_close(torch.cat([out["slow_path"], out["fast_path"]], dim), out["final"])
    torch.testing.assert_close(out["logits"], model(x))
    # every step's inputs and output have their cumulative widths
    last = len(model.step_widths) - 1
    n = len(widths)
    step = model.forward_paths(x, [f"stages.{last}.steps.{n - 1}.y_prev", f"stages.{last}.steps.{n - 1}.x",
                                   f"stages.{last}.steps.{n - 1}.y"])
    assert [t.shape[dim] for t in step.values()] == [widths[-2], widths[-1] - widths[-2], widths[-1]]
    assert sum(1 for s in site_names(model) if s.startswith("blocks.")) == len(model.block_modules())


@pytest.mark.parametrize("name", ["deit_micro", "swin_micro", "resnet_micro", "deit_s", "swin_t", "resnet50"])
def test_baselines_expose_blocks_the_same_way(name):
    model, x = small(name)
    names = site_names(model)
    assert "final" in names and "blocks.0" in names and "slow_path" not in names
    model.eval()
    out = forward_paths(model, x, ["blocks.0", "final"])
    torch.testing.assert_close(out["final"], model.forward_features(x))
    with pytest.raises(SiteError, match="baseline without slow/fast paths"):
        forward_paths(model, x, ["slow_path"])


def test_ablating_the_fast_path_at_the_merge_point_changes_the_output_only_through_it():
    torch.manual_seed(0)
    model, x = small("steps_deit_micro")
    model.eval()
    site = "stages.0.steps.2.x"
    with torch.no_grad():
        clean = model.forward_paths(x, ["logits", site, "stages.0.steps.2.y_prev"])
        ablated = model.forward_paths(x, ["logits", site, "stages.0.steps.2.y_prev"], edits={site: torch.zeros_like})
    assert torch.count_nonzero(ablated[site]) == 0
    torch.testing.assert_close(ablated["stages.0.steps.2.y_prev"], clean["stages.0.steps.2.y_prev"])
    assert not torch.allclose(ablated["logits"], clean["logits"])
    # the same edit expressed as a channel ablation of the last step's input, via `intervene`
    with torch.no_grad(), intervene(model, {site: ablate_channels(0, 32)}):
        torch.testing.assert_close(model(x), ablated["logits"])
    # hooks are gone after the block
    with torch.no_grad():
        torch.testing.assert_close(model(x), clean["logits"])


def test_unknown_names_give_one_line_errors():
    with pytest.raises(UnknownModelError, match=r"unknown model 'steps_vit'; allowed: steps_deit_t"):
        create_model("steps_vit")
    model, x = small("steps_deit_micro")
    with pytest.raises(SiteError, match=r"unknown site 'stages.0.steps.9.x'"):
        model.forward_paths(x, ["stages.0.steps.9.x"])
    with pytest.raises(ValueError, match=r"width 128 is not divisible by head dim / group size 48"):
        timm.create_model("steps_deit_micro", head_dim=48)
    with pytest.raises(ValueError, match=r"\[100\] not a positive multiple of 32 .*allowed: multiples of 32"):
        timm.create_model("steps_deit_micro", step_widths=(64, 96, 100, 128), step_depths=(1, 1, 1, 1))


def test_forward_intermediates_returns_step_outputs():
    model, x = small("steps_deit_micro")
    final, inter = model.eval().forward_intermediates(x)
    assert [t.shape[1] for t in inter] == [64, 96, 128] and inter[0].shape[-2:] == (7, 7)
    torch.testing.assert_close(final, model.forward_features(x))


def test_paper_table_within_five_percent_and_same_blocks():
    for name in paper_models():
        c = count_model(name)
        if c.paper_blocks is not None:
            assert c.blocks == c.paper_blocks, name
        if c.paper_layers is not None and name != "steps_resnet18":
            assert c.layers == c.paper_layers, name
        for ours, theirs in ((c.params_m, c.paper_params_m), (c.gmacs, c.paper_gmacs)):
            if theirs is not None:
                assert abs(ours / theirs - 1) <= 0.05, (name, ours, theirs)


def test_micro_configs_are_matched_and_small():
    for steps, base in [("steps_deit_micro", "deit_micro"), ("steps_swin_micro", "swin_micro"),
                        ("steps_resnet_micro", "resnet_micro")]:
        a = count_model(steps, input_size=(1, 28, 28), num_classes=10)
        b = count_model(base, input_size=(1, 28, 28), num_classes=10)
        assert abs(a.gmacs / b.gmacs - 1) < 0.15 and a.params_m < 5, (a, b)


def test_probe_models_json_cli():
    from experiments.cli import main
    result = CliRunner().invoke(main, ["models", "--micro", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["name"] for r in rows} >= {"steps_deit_micro", "deit_micro"}
    steps = next(r for r in rows if r["name"] == "steps_deit_micro")
    assert steps["widths"] == [[64, 96, 128]] and steps["blocks"] == 12
