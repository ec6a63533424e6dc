"""Attribution and causal tests by path: completeness, shares, a disconnected fast path, map statistics, CLI."""
import math
import re

import mlflow
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import models
from experiments import tracking
from experiments.cli import main
from experiments.data import load_dataset
from models.sites import StepsPaths
from models.steps import HookPoint, StepsStack
from probes import causal
from probes.attribution import causal_tests, input_maps, map_stats, matched_split, path_shares


class ChannelwiseBlock(nn.Module):
    """A residual block that never mixes channels, so each path reaches only its own output channels."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(width))
        self.shift = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(x * self.scale + self.shift)


class TinySteps(StepsPaths, nn.Module):
    """A hand-built Steps model on 28 px images; `fast_to_head=False` cuts the fast path off the logits."""

    def __init__(self, widths=(8, 16, 24), num_classes: int = 16, fast_to_head: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(49, widths[-1]))
        self.stack = StepsStack(widths, (1,) * len(widths), lambda w, i, p: ChannelwiseBlock(w), channel_dim=-1)
        self.final = HookPoint()
        self.head = nn.Linear(widths[-1], num_classes)
        if not fast_to_head:
            with torch.no_grad():
                self.head.weight[:, widths[-2]:] = 0

    def steps_stacks(self):
        return [self.stack]

    def block_modules(self):
        return self.stack.block_modules()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final(self.stack(self.stem(x))))


@pytest.fixture(scope="module")
def test_ds():
    return load_dataset("hierarchy", "test", limit=16, seed=0, n=200)


def _tiny(fast_to_head: bool) -> TinySteps:
    torch.manual_seed(0)
    return TinySteps(fast_to_head=fast_to_head).eval()


def test_completeness_and_shares_on_steps_micro(test_ds):
    torch.manual_seed(0)
    model = models.create_model("steps_deit_micro", num_classes=16, step_depths=(1, 1, 1)).eval()
    ds = test_ds.subset(range(2))
    image = ds.normalise(ds.images[:1])
    for cut in (causal.merge_cut(model, image), causal.final_cut(model, image)):
        assert cut.split == 96 and cut.width == 128
        for level in ("fine", "coarse"):
            sh = path_shares(model, ds, cut, level=level, n_steps=16, batch_size=2, progress=False)
            # Completeness: the attributions add up to F(x) - F(baseline), computed here independently.
            scale = sh.outdiff.abs().mean()
            assert (sh.total - sh.outdiff).abs().max() <= 0.01 * scale
            assert sh.delta.abs().max() <= 0.01 * scale
            s = sh.summary()
            assert s["share.slow"] + s["share.fast"] == pytest.approx(1.0)
            assert s["attr.slow"] + s["attr.fast"] == pytest.approx(s["attr.total"], abs=1e-6)


def test_baseline_gets_the_matched_split(test_ds):
    model = models.create_model("deit_micro", num_classes=16, depth=2).eval()
    image = test_ds.normalise(test_ds.images[:1])
    split = matched_split(model, "deit_micro")
    merge, final = causal.merge_cut(model, image, split), causal.final_cut(model, image, split)
    assert split == 96  # steps_deit_micro's slow width
    assert merge.sites == ("blocks.0",) and (merge.split, merge.width) == (96, 128)
    assert final.sites == ("final",) and final.split == 96
    sh = path_shares(model, test_ds.subset(range(2)), merge, n_steps=16, progress=False)
    assert sh.delta.abs().max() <= 0.01 * sh.outdiff.abs().mean()


def test_disconnected_fast_path_has_no_share_and_no_effect(test_ds):
    cut_off, joined = _tiny(fast_to_head=False), _tiny(fast_to_head=True)
    image = test_ds.normalise(test_ds.images[:1])
    for make_cut in (causal.merge_cut, causal.final_cut):
        cut = make_cut(cut_off, image)
        sh = path_shares(cut_off, test_ds, cut, n_steps=16, progress=False)
        assert sh.fast.abs().max() == 0
        assert torch.allclose(sh.slow, sh.outdiff, atol=1e-4)
        assert path_shares(joined, test_ds, cut, n_steps=16, progress=False).fast.abs().max() > 1e-3
    cut = causal.merge_cut(cut_off, image)
    metrics, rows = causal_tests(cut_off, test_ds, cut, ("fast",), modes=("zero", "resample"), draws=1,
                                 progress=False)
    for mode in ("zero", "resample"):
        assert metrics[f"ablate.fast.{mode}.fine_drop"] == 0
        assert metrics[f"ablate.fast.{mode}.coarse_drop"] == 0
        assert abs(metrics[f"ablate.fast.{mode}.loss_increase"]) < 1e-6
    assert metrics["patch.fast.follow_fine"] in (0.0,) or math.isnan(metrics["patch.fast.follow_fine"])
    # Damage matching: the control searched k and reports a curve for it.
    assert rows[0]["control"]["k"] >= 1 and rows[0]["control_curve"]
    # The same ablation on the connected model does something.
    on, _ = causal_tests(joined, test_ds, causal.merge_cut(joined, image), ("fast",), modes=("zero",), draws=1,
                         progress=False)
    assert on["ablate.fast.zero.loss_increase"] != 0


@pytest.mark.parametrize("method", ["ig", "saliency", "gradshap", "deeplift"])
def test_input_maps_of_a_linear_head_have_the_closed_form(method):
    """On a linear head f(x) = w . x the attributions are known: saliency is the gradient w, and integrated
    gradients, DeepLift and GradientShap (zero reference) are w * x, with zero convergence delta."""
    torch.manual_seed(0)
    images = torch.randn(3, 2, 8, 8)
    head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 4))
    target = torch.tensor([0, 3, 1])
    maps, delta = input_maps(head, images, target, method, n_steps=16)
    w = head[1].weight.detach()[target].view(3, 2, 8, 8)
    expected = (w if method == "saliency" else w * images).sum(1)
    assert maps.shape == (3, 8, 8)
    assert torch.allclose(maps, expected, atol=1e-4)
    if method == "saliency":
        assert delta is None
    else:
        assert delta.abs().max() < 1e-3


def test_occlusion_map_of_a_one_pixel_head_is_local():
    """A head that reads one pixel: occluding any window over it costs w * x there, so the map equals w * x at
    that pixel and is zero wherever no occlusion window covers both."""
    torch.manual_seed(0)
    images = torch.randn(2, 1, 28, 28)
    head = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 2, bias=False))
    with torch.no_grad():
        head[1].weight.zero_()
        head[1].weight[1, 14 * 28 + 14] = 2.0  # pixel (14, 14)
    maps, delta = input_maps(head, images, torch.tensor([1, 1]), "occlusion")
    assert delta is None
    assert torch.allclose(maps[:, 14, 14], 2.0 * images[:, 0, 14, 14], atol=1e-5)
    far = torch.ones(28, 28, dtype=torch.bool)
    far[14 - 8:14 + 9, 14 - 8:14 + 9] = False  # window 4 px, stride 2: nothing beyond 8 px shares a window
    assert maps[:, far].abs().max() == 0


def test_map_stats_separate_global_from_local():
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    blob = torch.exp(-((yy - 14) ** 2 + (xx - 14) ** 2) / 60)
    stripes = ((xx // 2) % 2) * 2 - 1.0  # period 4 px: 0.25 cycles/px
    spike = torch.zeros(28, 28)
    spike[3, 5] = 1
    s = map_stats(torch.stack([blob, stripes, spike, torch.ones(28, 28)]))
    assert s["low_freq_share"][0] > 0.95 and s["low_freq_share"][1] < 0.05
    assert s["entropy"][2] == 0 and s["entropy"][3] == pytest.approx(1.0)


@pytest.mark.parametrize("flag, value", [("--method", "lime"), ("--path", "middle"), ("--ablation", "noise")])
def test_cli_bad_names_are_one_line_errors(flag, value):
    res = CliRunner().invoke(main, ["attribute", "--model", "steps_deit_micro", flag, value])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and value in lines[0] and "one of" in lines[0]


@pytest.mark.slow
def test_cli_end_to_end_records_a_run():
    torch.manual_seed(0)
    with tracking.tracked_run("train", {}) as train_run:
        # A frozen model is a StepsLab model name + create kwargs (rebuilt by timm), so not the hand-made TinySteps.
        kwargs = {"num_classes": 16, "in_chans": 1, "img_size": 28}
        tracking.register_frozen(models.create_model("steps_deit_micro", **kwargs), "steps_deit_micro-attr-test",
                                 model_info={"model": "steps_deit_micro", "create_kwargs": kwargs,
                                             "dataset": "hierarchy", "in_chans": 1, "img_size": 28})
    src = train_run.info.run_id
    args = ["attribute", "--run", src, "--limit", "8", "--probe-limit", "48", "--steps", "8", "--draws", "1",
            "--ablation", "zero", "--ablation", "resample", "--batch-size", "8"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    run = mlflow.get_run(re.search(r"^run ([0-9a-f]{32})$", res.output, re.M).group(1))
    assert run.data.tags["stepslab.kind"] == "attribute" and run.data.tags["stepslab.source_run_id"] == src
    m = run.data.metrics
    assert m["share.slow.fine"] + m["share.fast.fine"] == pytest.approx(1.0)
    for key in ("delta.max", "map.fast.low_freq_share", "map.slow.entropy", "selectivity.fast",
                "selectivity.slow.resample.ci_low", "patch.fast.follow_fine", "control.slow.zero.k"):
        assert key in m
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "maps")}
    assert "maps/grid.png" in arts

    # Too few steps for the tolerance: a one-line error, exit 2, and the failed run keeps its delta.
    res = CliRunner().invoke(main, args[:-10] + ["--steps", "1", "--max-delta", "1e-6"])
    assert res.exit_code == 2 and re.search(r"^error: attributions miss completeness: .*--steps", res.output, re.M)
    failed = tracking.find_runs("attribute").iloc[0]
    assert failed["status"] == "FAILED" and failed["metrics.delta.rel"] > 1e-6
