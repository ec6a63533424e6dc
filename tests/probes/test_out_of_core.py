"""Out-of-core probes: features streamed from shards give the in-memory fit, MDL and controls."""
from __future__ import annotations

import numpy as np
import pytest

from probes.linear import fit_probe, fit_probe_streamed
from probes.measures import Labels, measure, pca_k, prequential_mdl
from probes.shards import ShardedArray


@pytest.fixture(autouse=True)
def chunked(monkeypatch):
    """Stream every solve chunk by chunk (small selections are otherwise gathered into memory first)."""
    from probes import linear
    monkeypatch.setattr(linear, "_GATHER_BYTES", 0)


def _sharded(x: np.ndarray, size: int) -> ShardedArray:
    parts = tuple(x[i:i + size] for i in range(0, len(x), size))
    return ShardedArray(parts, x.shape, x.dtype)


@pytest.fixture(scope="module")
def data():
    # Five overlapping Gaussian classes in 24 dims with unequal scales: a probe far from perfect, so a wrong
    # standardiser, C or optimum shows in the scores.
    rng = np.random.default_rng(0)
    means = rng.normal(0, 0.6, (5, 24))
    scale = np.linspace(0.5, 3.0, 24)
    def draw(n):
        y = rng.integers(0, 5, n)
        return ((means[y] + rng.normal(0, 1, (n, 24))) * scale + 1.0).astype(np.float32), y
    (xtr, ytr), (xte, yte) = draw(700), draw(300)
    return xtr, ytr, xte, yte


def test_streamed_probe_is_the_in_memory_probe(data):
    xtr, ytr, xte, yte = data
    mem = fit_probe(xtr, ytr, xte, yte, probe="torch")  # the solver the streamed fit runs chunk by chunk
    out = fit_probe_streamed(_sharded(xtr, 128), ytr, _sharded(xte, 100), yte)
    assert 0.4 < mem.acc < 0.95  # a problem where the scores can move
    assert out.C == mem.C and out.backend == "torch-stream"
    assert abs(out.acc - mem.acc) <= 1 / len(yte) and abs(out.xent - mem.xent) < 1e-3
    np.testing.assert_allclose(out.coef, mem.coef, atol=2e-3)
    # Only the chunking differs: a single chunk and chunks of 7 give the same probe.
    one = fit_probe_streamed(_sharded(xtr, 10_000), ytr, xte, yte, C=mem.C)
    seven = fit_probe_streamed(_sharded(xtr, 7), ytr, xte, yte, C=mem.C)
    np.testing.assert_allclose(one.coef, seven.coef, atol=2e-3)  # float rounding of the chunk sums


def test_small_selections_are_gathered_with_the_same_result(data, monkeypatch):
    from probes import linear

    xtr, ytr, xte, yte = data
    streamed = fit_probe_streamed(_sharded(xtr, 64), ytr, xte, yte, C=1.0)
    monkeypatch.setattr(linear, "_GATHER_BYTES", 256 << 20)
    gathered = fit_probe_streamed(_sharded(xtr, 64), ytr, xte, yte, C=1.0)
    np.testing.assert_allclose(gathered.coef, streamed.coef, atol=2e-3)  # float rounding of the summed loss
    assert abs(gathered.acc - streamed.acc) <= 1 / len(yte)
    assert linear._compact(_sharded(xtr, 64), None)[1] is None


def test_streamed_mdl_and_controls_match(data):
    xtr, ytr, xte, yte = data
    mem = prequential_mdl(xtr, ytr, 5, seed=3, probe="torch")
    out = prequential_mdl(_sharded(xtr, 100), ytr, 5, seed=3)
    np.testing.assert_array_equal(out.order, mem.order)
    assert abs(out.bits - mem.bits) / mem.bits < 2e-3
    a, b = pca_k(xtr, xte, 4)
    sa, sb = pca_k(_sharded(xtr, 100), _sharded(xte, 100), 4)
    # The same components up to sign: compare absolute projections.
    np.testing.assert_allclose(np.abs(sa.load()), np.abs(a), atol=1e-3)
    np.testing.assert_allclose(np.abs(sb.load()), np.abs(b), atol=1e-3)
    fine = ytr
    ltr = Labels(coarse=ytr % 2, fine=fine, fine_to_coarse=[0, 1, 0, 1, 0], coarse_names=["a", "b"])
    lte = Labels(coarse=yte % 2, fine=yte, fine_to_coarse=[0, 1, 0, 1, 0], coarse_names=["a", "b"])
    kw = dict(full={"p"}, n_boot=50, curves=False, probe="torch")
    rows_mem = measure({"p": xtr}, {"p": xte}, ltr, lte, ["coarse", "fine"], **kw)[0]
    rows_out = measure({"p": _sharded(xtr, 128)}, {"p": _sharded(xte, 128)}, ltr, lte, ["coarse", "fine"], **kw)[0]
    for rm, ro in zip(rows_mem, rows_out):
        assert ro["level"] == rm["level"]
        for col in ("acc", "acc_pca", "acc_rand"):
            assert abs(ro[col] - rm[col]) <= 2 / len(yte), (col, ro[col], rm[col])
        assert abs(ro["mdl_ratio"] - rm["mdl_ratio"]) < 2e-3


def test_parse_memory():
    from experiments.probe_run import parse_memory
    from models.errors import UserError

    assert parse_memory("8G") == 8 << 30 and parse_memory("512m") == 512 << 20 and parse_memory("4096") == 4096
    assert parse_memory("1.5GiB") == 3 << 29
    with pytest.raises(UserError, match="'lots'"):
        parse_memory("lots")


@pytest.mark.slow
def _frozen_micro(registered_name: str) -> str:
    """A seeded, untrained Steps-DeiT-micro for hierarchy (16 classes, 1x28x28), frozen as `registered_name`."""
    import torch

    import models
    from experiments import tracking

    torch.manual_seed(0)
    kwargs = {"num_classes": 16, "in_chans": 1, "img_size": 28}
    model = models.create_model("steps_deit_micro", **kwargs)
    info = {"model": "steps_deit_micro", "dataset": "hierarchy", "create_kwargs": kwargs, "in_chans": 1,
            "img_size": 28}
    with tracking.tracked_run("train", {"model": "steps_deit_micro"}):
        return tracking.register_frozen(model, registered_name, model_info=info)


def test_probe_run_streamed_matches_in_memory():
    """`probe run --max-memory` below the features' size streams them from shards: same scores as in memory."""
    from click.testing import CliRunner
    from mlflow import MlflowClient

    from experiments.cli import main

    ref = _frozen_micro("steps_deit_micro-hierarchy-ooc")
    args = ["run", "--run", ref, "--path", "all", "--no-curves", "--limit", "320", "--test-limit", "160",
            "--probe", "torch"]  # the streamed probes run the torch solver (auto is torch too; said explicitly)
    metrics = []
    for extra in ([], ["--max-memory", "64K"]):
        res = CliRunner().invoke(main, [*args, *extra], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        run_id = res.stdout.strip().splitlines()[-1].split()[2]
        run = MlflowClient().get_run(run_id)
        metrics.append(run.data.metrics)
        if extra:
            assert "streaming the probes" in res.stdout and run.data.params["streamed"] == "True"
    mem, out = metrics
    for name in ("acc.slow.coarse", "acc.fast.fine", "acc.full.coarse", "acc_pca.slow.fine", "acc_rand.fast.coarse"):
        assert abs(out[name] - mem[name]) <= 0.005, (name, out[name], mem[name])  # issue: within 0.5 points
    assert abs(out["mdl_ratio.slow.coarse"] - mem["mdl_ratio.slow.coarse"]) < 5e-3


@pytest.mark.slow
def test_probe_run_under_torchrun_gives_the_one_process_numbers(tmp_path):
    """`torchrun --nproc_per_node=2 -m experiments.cli run ...`: both gloo processes extract their shards, rank 0
    alone probes, records and prints; every metric equals one process's streamed run (--max-memory)."""
    import os
    import re
    import socket
    import subprocess
    import sys

    from mlflow import MlflowClient

    _frozen_micro("steps_deit_micro-hierarchy-torchrun")
    # --model (the newest frozen one, registered just above): torchrun's own parser would take --run for its
    # --run-path.
    args = ["run", "--model", "steps_deit_micro", "--path", "all", "--no-curves", "--limit", "320",
            "--test-limit", "160"]

    def launch(nproc: int, *extra: str) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
               "STEPSLAB_CACHE": str(tmp_path / f"cache{nproc}")}  # each run extracts afresh
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                               f"--master_port={port}", "--master_addr=127.0.0.1", "-m", "experiments.cli",
                               *args, *extra], env=env, capture_output=True, text=True, timeout=600)

    one, two = launch(1, "--max-memory", "64K"), launch(2)
    for proc in (one, two):
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes extract their shards" in two.stdout
    assert len(re.findall(r"probe run [0-9a-f]{32}", two.stdout)) == 1  # rank 0 alone records and prints
    runs = [MlflowClient().get_run(re.search(r"probe run ([0-9a-f]{32})", p.stdout).group(1)) for p in (one, two)]
    assert runs[1].data.params["world_size"] == "2" and runs[1].data.params["streamed"] == "True"
    shards = sorted(p.name for p in (tmp_path / "cache2").rglob("*") if p.is_file())
    assert shards == sorted(p.name for p in (tmp_path / "cache1").rglob("*") if p.is_file())
    probe_metrics = [{k: v for k, v in r.data.metrics.items() if not k.startswith("system/")} for r in runs]
    assert probe_metrics[0] == probe_metrics[1] and "dol.acc" in probe_metrics[0]
