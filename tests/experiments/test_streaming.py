"""experiments/streaming.py and the streamed paths of experiments/data.py and experiments/train.py (CPU, small)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from experiments import train as T  # first: it sets OMP_WAIT_POLICY before torch loads OpenMP

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from experiments.data import DataError, LabeledImages, load_dataset, open_dataset  # noqa: E402
from experiments.options import TrainConfig  # noqa: E402
from experiments.streaming import StreamingImages, loader_of  # noqa: E402


def make_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 6, size: int = 40) -> Path:
    """train/ and test/ of small JPEGs, one colour cast per class so a model can tell them apart."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = (rng.random((size, size + 8, 3)) * 120).astype(np.uint8)
                a[..., k % 3] += 120
                Image.fromarray(a).save(root / split / c / f"{i}.jpg", quality=90)
    return root


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


def test_in_memory_training_unchanged_by_the_streaming_rework():
    """Same seed, same final weights and metrics as the loop before streaming existed (commit 9d8d4fa; digest
    taken there with this exact config, torch 2.14.1 on x86 CPU)."""
    cfg = TrainConfig(model="steps_deit_micro", dataset="hierarchy", data_options={"n": 128}, epochs=2,
                      batch_size=16, limit=96, test_limit=48, warmup_epochs=0.5, drop_path=0.1, seed=3,
                      register=False, device="cpu")
    train_ds, test_ds = T.load_data(cfg)
    assert isinstance(train_ds, LabeledImages)  # auto keeps 28 px data in memory
    state = T.prepare(cfg, train_ds, torch.device("cpu"))
    T.fit(cfg, state, train_ds, torch.device("cpu"), progress=False)
    assert weights_digest(state.model) == "f1a5a9d443b7c0ad"
    ev = T.evaluate(state.model, test_ds, "cpu")
    assert ev["fine_acc"] == pytest.approx(0.10416666666666667, abs=1e-12)
    assert ev["loss"] == pytest.approx(2.761211077372233, rel=1e-9)


def test_streamed_imagefolder_matches_the_in_memory_one(tmp_path):
    root = make_folder(tmp_path / "f")
    mem = load_dataset("imagefolder", "train", data_dir=str(root), img_size=32)
    st = open_dataset("imagefolder", "train", data_dir=str(root), img_size=32)
    assert isinstance(st, StreamingImages) and len(st) == len(mem) == 18
    assert (st.fine_names, st.coarse_names, st.fine_to_coarse) == (mem.fine_names, mem.coarse_names,
                                                                     mem.fine_to_coarse)
    assert (st.in_chans, st.img_size, st.mean, st.std) == (mem.in_chans, mem.img_size, mem.mean, mem.std)
    assert sorted(st.fine.tolist()) == sorted(mem.fine.tolist())
    x, fine, coarse = st[0]
    j = [str(p) for p in sorted((root / "train" / mem.fine_names[fine]).glob("*"))].index(
        str(root / "train" / st.keys[0]))
    ref = mem[int(np.flatnonzero(mem.fine.numpy() == fine)[j])][0]
    # Both resize the short side and centre-crop; the resamplers differ by rounding only.
    assert x.shape == ref.shape == (3, 32, 32) and (x - ref).abs().mean() < 0.05
    # The shared interface: the same call on both kinds gives (normalised float images, fine, coarse).
    for ds in (mem, st):
        xb, fb, cb = next(iter(loader_of(ds)(4, shuffle=False, seed=0)))
        assert xb.shape == (4, 3, 32, 32) and xb.dtype == torch.float32 and fb.dtype == cb.dtype == torch.int64
    with pytest.raises(DataError, match="hierarchy is held in memory only"):
        open_dataset("hierarchy", "train", mode="stream")


def test_stream_loader_shards_seeds_and_skips(tmp_path):
    ds = open_dataset("imagefolder", "train", data_dir=str(make_folder(tmp_path / "f")), img_size=16)

    def fines(**kw):
        return torch.cat([f for _, f, _ in ds.loader(3, seed=5, shuffle=True, **kw)]).tolist()

    assert fines(epoch=0) == fines(epoch=0) != fines(epoch=1)               # a seed fixes the order per epoch
    r0, r1 = fines(rank=0, world_size=2), fines(rank=1, world_size=2)
    assert len(r0) == len(r1) == 9
    order = list(torch.utils.data.DistributedSampler(ds, 2, 0, shuffle=True, seed=5))
    order1 = list(torch.utils.data.DistributedSampler(ds, 2, 1, shuffle=True, seed=5))
    assert not set(order) & set(order1) and len(set(order) | set(order1)) == 18  # disjoint, covering shards
    assert fines(epoch=0, start=2) == fines(epoch=0)[6:]                   # resume mid-epoch skips batches done
    # Unshuffled shards (extraction): disjoint, unpadded, every example once, the same on both kinds of data.
    mem = load_dataset("imagefolder", "train", data_dir=str(tmp_path / "f"), img_size=16)
    for d in (ds, mem):
        parts = [torch.cat([x for x, _, _ in loader_of(d)(4, shuffle=False, seed=0, rank=r, world_size=3)])
                 for r in range(3)]
        assert [len(p) for p in parts] == [6, 6, 6]
        whole = torch.cat([x for x, _, _ in loader_of(d)(5, shuffle=False, seed=0)])
        assert torch.equal(torch.stack([parts[i % 3][i // 3] for i in range(18)]), whole)
    assert ds.fingerprint == open_dataset("imagefolder", "train", data_dir=str(tmp_path / "f"),
                                          img_size=16).fingerprint
    assert ds.subset(range(17)).fingerprint != ds.fingerprint


def test_train_on_a_streamed_folder_with_workers_logs_data_wait(tmp_path):
    root = make_folder(tmp_path / "f")
    cfg = TrainConfig(model="deit_micro", dataset="imagefolder", data_dir=str(root), data_options={"img_size": 28},
                      epochs=1, batch_size=6, workers=1, register=False, device="cpu", log_every=1,
                      checkpoint_dir=str(tmp_path / "ck"), grad_checkpointing=True)
    train_ds, test_ds = T.load_data(cfg)
    state = T.prepare(cfg, train_ds, torch.device("cpu"))
    assert state.model.grad_checkpointing
    logged = []
    assert T.fit(cfg, state, train_ds, torch.device("cpu"), on_log=lambda m, s: logged.append(m),
                 progress=False) is None
    assert state.step == 3 and len(logged) == 3
    assert all(0 <= m["train/data_wait_share"] <= 1 and m["train/images_per_s"] > 0 for m in logged)
    assert set(T.evaluate(state.model, test_ds, "cpu")) == {"fine_acc", "coarse_acc", "loss"}


def test_deit_recipe_on_streamed_and_in_memory_data(tmp_path):
    root = make_folder(tmp_path / "f")
    for dataset, options, data_dir in (("imagefolder", {"img_size": 28}, str(root)), ("hierarchy", {"n": 32}, None)):
        cfg = TrainConfig(model="deit_micro", dataset=dataset, data_dir=data_dir, data_options=options, epochs=1,
                          batch_size=6, workers=0, recipe="deit", ema_decay=0.5, register=False, device="cpu",
                          test_limit=8)
        train_ds, test_ds = T.load_data(cfg)
        state = T.prepare(cfg, train_ds, torch.device("cpu"))
        before = {k: v.clone() for k, v in state.ema.module.state_dict().items()}
        T.fit(cfg, state, train_ds, torch.device("cpu"), progress=False)
        ema = state.ema.module.state_dict()
        assert any(not torch.equal(before[k], ema[k]) for k in before)  # the EMA followed the model
        assert any(not torch.equal(ema[k], v) for k, v in state.model.state_dict().items() if v.is_floating_point())
    with pytest.raises(ValueError, match="batch_size must be even with --recipe deit"):
        T.validate(TrainConfig(recipe="deit", batch_size=7))


@pytest.mark.slow
def test_streamed_resume_mid_epoch_is_bitwise_equal(tmp_path):
    """Without per-image augmentation a streamed run stopped mid-epoch and resumed ends with the same weights as
    one never stopped: the resumed loader skips exactly the batches done, the RNG states come back."""
    root = make_folder(tmp_path / "f")
    base = dict(model="deit_micro", dataset="imagefolder", data_dir=str(root), data_options={"img_size": 28},
                epochs=2, batch_size=6, workers=0, augment=False, drop_path=0.1, register=False, device="cpu",
                log_every=1)
    straight = T.train(TrainConfig(**base, checkpoint_dir=str(tmp_path / "a")))
    stopped = T.train(TrainConfig(**base, checkpoint_dir=str(tmp_path / "b"), max_steps=4))  # epoch 2, step 1 of 3
    assert not stopped.complete and T.load_checkpoint(stopped.checkpoint)["epoch_step"] == 1
    resumed = T.train(TrainConfig(**base, checkpoint_dir=str(tmp_path / "b"), resume=True))
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    from mlflow import MlflowClient
    history = MlflowClient().get_metric_history(straight.run_id, "train/data_wait_share")
    assert len(history) == 6 and all(0 <= m.value <= 1 for m in history)
    assert MlflowClient().get_run(straight.run_id).data.tags["stepslab.data"] == "streamed"


DDP_SCRIPT = """
import os, torch
from experiments.train import TrainConfig, train
res = train(TrainConfig(**{cfg}))
torch.save(res.model.state_dict(), os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
if res.run_id:
    print("RUN", res.run_id, res.metrics["steps"])
"""


@pytest.mark.slow
def test_torchrun_two_gloo_processes_on_a_streamed_folder(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    root = make_folder(tmp_path / "f")
    cfg = dict(model="deit_micro", dataset="imagefolder", data_dir=str(root), data_options={"img_size": 28},
               epochs=1, batch_size=3, workers=1, register=False, device="cpu", checkpoint_dir=str(tmp_path / "ck"))
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(cfg=repr(cfg), out=str(tmp_path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "--master_addr=127.0.0.1", str(script)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_line = [line for line in proc.stdout.splitlines() if line.startswith("RUN")]
    assert len(run_line) == 1 and run_line[0].split()[2] == "3"  # 18 images / 2 ranks / 3 per batch
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
