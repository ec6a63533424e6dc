"""Depth studies: each runs end to end with --quick through the CLI into one MLflow run, and the measures they
rest on hold where the answer is known (Nielsen's vanishing gradients, gamma's definition, identity blocks)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from experiments import data
from experiments.cli import main
from experiments.data import load_dataset
from experiments.studies import load_study, make_config, split_depth
from experiments.studies.degradation import make_net
from experiments.studies.gradients import SigmoidMLP, bias_grad_norms, block_gradients, nielsen_inputs
from experiments.studies.shortcut import make_deit, make_steps_deit, measure, shortcut_ratio, token_std
from experiments.tracking import find_runs
from models.sites import forward_paths

needs_fm = pytest.mark.skipif(not (Path(data.FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file(),
                              reason="Debian package dataset-fashion-mnist not installed")


def one_line_error(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def run_quick(name: str, *args: str) -> tuple[str, dict, dict, dict]:
    """`probe study NAME --quick ARGS` -> (run id, metrics, tags, results JSON) of the run it recorded."""
    result = CliRunner().invoke(main, ["study", name, "--quick", *args])
    assert result.exit_code == 0, result.output
    runs = find_runs("study", {"stepslab.study": name})
    run_id = runs.iloc[0]["run_id"]
    assert run_id in result.output
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {f"{name}.json", f"{name}.png"} <= arts
    local = client.download_artifacts(run_id, f"{name}.json")
    return run_id, run.data.metrics, run.data.tags, json.loads(Path(local).read_text())


# ------------------------------------------------------------------------------------------------ CLI


def test_unknown_study_is_a_one_line_error():
    msg = one_line_error(CliRunner().invoke(main, ["study", "nope"]))
    assert "nope" in msg and "gradients" in msg and "depth" in msg


def test_bad_option_value_is_a_one_line_error():
    msg = one_line_error(CliRunner().invoke(main, ["study", "degradation", "--quick", "--depths", "2,x"]))
    assert "--depths" in msg
    msg = one_line_error(CliRunner().invoke(main, ["study", "degradation", "--quick", "--families", "dense"]))
    assert "dense" in msg


def test_config_parsing_quick_then_overrides():
    module = load_study("degradation")
    cfg = make_config(module, quick=True, seeds="3,4", depths=None)
    assert cfg.seeds == (3, 4) and cfg.depths == module.QUICK["depths"]
    assert make_config(module).depths == module.Config().depths


def test_split_depth_puts_extra_blocks_last():
    assert split_depth(12, 3) == [4, 4, 4]
    assert split_depth(22, 4) == [5, 5, 6, 6]
    assert sum(split_depth(7, 3)) == 7


# ------------------------------------------------------------------------------------------------ end to end


@needs_fm
@pytest.mark.slow
def test_gradients_quick_records_a_run():
    run_id, metrics, tags, res = run_quick("gradients")
    assert tags["stepslab.kind"] == "study" and tags["stepslab.study"] == "gradients"
    for key in ("seed0.mlp2.grad_norm.layer1", "seed0.mlp2.grad_norm.layer2", "mlp2.grad_norm.layer1.mean",
                "mlp2.first_last_ratio.mean", "seed0.residual.d4.grad_param.block0",
                "seed0.steps.d4.grad_input.block3", "plain.d4.first_last.param.mean", "runtime_s"):
        assert key in metrics, key
    assert len(res["mlp"]["2"]["grad_norm_mean"]) == res["config"]["epochs"] + 1
    history = MlflowClient().get_metric_history(run_id, "seed0.mlp2.grad_norm.layer1")
    assert [m.step for m in history] == list(range(res["config"]["epochs"] + 1))  # logged every epoch (quick)


@needs_fm
@pytest.mark.slow
def test_degradation_quick_records_a_run():
    run_id, metrics, _, res = run_quick("degradation")
    for f in ("plain", "residual", "highway", "steps"):
        assert 0 <= metrics[f"{f}.train_error.mean"] <= 1
        for d in res["config"]["depths"]:
            assert f"seed0.{f}.d{d}.train_error" in metrics
    steps = [m.step for m in MlflowClient().get_metric_history(run_id, "residual.train_error.mean")]
    assert sorted(steps) == sorted(res["config"]["depths"])  # error against depth: step = depth
    rows = res["results"]
    assert rows["steps"]["4"]["params"] == pytest.approx(rows["residual"]["4"]["params"], rel=0.35)


@needs_fm
@pytest.mark.slow
def test_shortcut_quick_records_a_run():
    _, metrics, _, res = run_quick("shortcut")
    assert metrics["seed0.deit.d3.gamma.z0"] == 1.0 and metrics["seed0.steps.d3.gamma.z0"] == 1.0
    assert metrics["seed0.steps.d3.step1.gamma.z1"] == 1.0  # step 1 enters after one block
    assert "seed0.steps.d3.step2.jac.z3" in metrics and "deit.d3.jac.z3.mean" in metrics
    assert set(res["results"]["steps.d3"]["mean"]) == {"0", "2"}


@needs_fm
@pytest.mark.slow
def test_depth_quick_records_a_run():
    _, metrics, _, res = run_quick("depth")
    assert metrics["budget.macs"] > 0 and "deit.test_acc.mean" in metrics and "steps.train_acc.mean" in metrics
    for rows in res["results"].values():
        for row in rows.values():
            assert 0.7 < row["macs_ratio"] < 1.3  # budget matched to the reference DeiT's MACs


# ------------------------------------------------------------------------------------------------ known answers


@needs_fm
def test_sigmoid_mlp_first_layer_learns_slower_than_last_at_init():
    """Nielsen ch. 5: in [784, 30, 30, 30, 30, 10] the first hidden layer's ||dC/db|| is far below the fourth's."""
    ds = load_dataset("fashion_mnist", "train", limit=500)
    x, target, _ = nielsen_inputs(ds, torch.device("cpu"))
    norms = []
    for seed in range(4):
        net = SigmoidMLP([784, 30, 30, 30, 30, 10], torch.Generator().manual_seed(seed))
        for cost in ("cross_entropy", "quadratic"):
            norms.append(bias_grad_norms(net, x, target, cost)[0])
    mean = [sum(n[l] for n in norms) / len(norms) for l in range(4)]
    assert mean[0] < 0.5 * mean[3]
    assert sum(n[0] < n[3] for n in norms) >= len(norms) - 1


@pytest.mark.parametrize("family", ["residual", "steps"])
def test_deep_residual_and_steps_keep_the_first_block_gradient(family):
    torch.manual_seed(0)
    net = make_net(family, depth=16, width=32, n_steps=4)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    param, grad_in = block_gradients(net, x, y)
    assert len(param) == len(grad_in) == 16
    assert param[0] / param[-1] > 0.1 and grad_in[0] / grad_in[-1] > 0.3


def test_shortcut_ratio_is_sigma0_over_sigmal_on_a_hand_computed_tensor():
    z0 = torch.tensor([[[1.0, -1.0, 1.0, -1.0], [2.0, 0.0, 2.0, 0.0]]])  # per-token variances 1, 1
    zl = torch.tensor([[[3.0, -3.0, 3.0, -3.0], [0.0, 0.0, 0.0, 4.0]]])  # 9 and 3: mean 6
    assert float(token_std(z0)) == pytest.approx(1.0)
    assert shortcut_ratio(z0, zl) == pytest.approx(1 / math.sqrt(6))
    assert shortcut_ratio(z0, z0) == 1.0


@pytest.mark.parametrize("name", ["deit", "steps"])
def test_measure_matches_sites_and_gamma0_is_one(name):
    torch.manual_seed(0)
    model = make_deit(32, 3, 8, 7) if name == "deit" else make_steps_deit(32, 3, 3, 8, 7)
    x = torch.randn(4, 1, 28, 28)
    m = measure(model, x)
    seen = {}
    hook = model.blocks.register_forward_pre_hook(lambda mod, args: seen.__setitem__("z0", args[0]))
    sites = forward_paths(model, x)
    hook.remove()
    z0 = seen["z0"]
    assert m["gamma"][0] == 1.0 and len(m["gamma"]) == 4 and len(m["jac"]) == 3
    for l in range(1, 4):
        zl = sites[f"blocks.{l - 1}"]
        assert m["gamma"][l] == pytest.approx(shortcut_ratio(z0[..., :zl.shape[-1]], zl), rel=1e-5)
    if name == "steps":
        for i, s in enumerate(m["steps"]):
            a, b = s["channels"]
            xi = sites[f"stages.0.steps.{i}.x"]
            assert s["entry"] == i and s["gamma"][0] == 1.0 and xi.shape[-1] == b - a
            last = sites["blocks.2"][..., a:b]
            assert s["gamma"][-1] == pytest.approx(shortcut_ratio(xi, last), rel=1e-5)


def test_identity_blocks_give_gamma_one_and_the_layernorm_jacobian():
    """Zeroed residual branches: z_l = z_0, so gamma_l = 1 and dz^_l/dz^_0 is LayerNorm's projection, whose
    normalised Frobenius norm is sqrt((C - 2) / C)."""
    torch.manual_seed(0)
    for model, width in ((make_deit(32, 3, 8, 7), 32), (make_steps_deit(32, 3, 3, 8, 7), 16)):
        for block in model.blocks.modules():
            if hasattr(block, "attn") and hasattr(block, "mlp"):
                for layer in (block.attn.proj, block.mlp.fc2):
                    torch.nn.init.zeros_(layer.weight)
                    torch.nn.init.zeros_(layer.bias)
        m = measure(model, torch.randn(4, 1, 28, 28))
        assert m["gamma"] == pytest.approx([1.0] * 4, abs=1e-5)
        # DeiT: every block; Steps: the first block, still at the first step's width C_1 = 16.
        assert m["jac"][0] == pytest.approx(math.sqrt((width - 2) / width), abs=0.05)
