"""probes.shards / features.extract_sharded: sharded memory-mapped caches, manifest, resume, torchrun equality."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from experiments.data import load_dataset
from probes.features import extract, extract_sharded
from probes.shards import MANIFEST, open_shards

REPO = Path(__file__).resolve().parents[2]
NAMES = ["slow_path", "fast_path", "logits"]


@pytest.fixture(scope="module")
def ds():
    return load_dataset("hierarchy", "test", limit=40, seed=0, n=64)


@pytest.fixture(scope="module")
def steps():
    torch.manual_seed(0)
    return models.create_model("steps_deit_micro", num_classes=16).eval()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPSLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _shard_root(cache: Path) -> Path:
    (d,) = (cache / "shards").iterdir()
    return d


def test_sharded_equals_in_memory_with_manifest(steps, ds, cache):
    # 40 examples in shards of 16: 16 + 16 + 8, a short last shard; batches of 8 inside each shard, as in memory.
    ref = extract(steps, ds, NAMES, batch_size=8, cache=False)
    out = extract_sharded(steps, ds, NAMES, shard_size=16, batch_size=8, device="cpu")
    for n in NAMES:
        assert out[n].shape == ref[n].shape and [len(c) for c in out[n].chunks()] == [16, 16, 8]
        np.testing.assert_array_equal(out[n].load(), ref[n])
        np.testing.assert_array_equal(out[n].rows(10, 30), ref[n][10:30])
    d = _shard_root(cache)
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["n"] == 40 and len(manifest["shards"]) == 3
    assert manifest["sites"]["final"]["shape"] == [40, 128]  # slow/fast are selections of one stored site
    assert all(len(f["sha256"]) == 64 for s in manifest["shards"] for f in s["files"].values())
    assert isinstance(next(out["logits"].chunks()), np.memmap)  # read from disk page by page, never unpickled
    half = extract_sharded(steps, ds, ["final"], shard_size=16, batch_size=8, device="cpu", dtype="float16")
    assert half["final"].dtype == np.float16
    full = np.concatenate([ref["slow_path"], ref["fast_path"]], 1)
    np.testing.assert_allclose(half["final"].load(), full, rtol=2e-3, atol=2e-3)


def test_interrupted_extraction_resumes_from_finished_shards(steps, ds, cache):
    class Stop(Exception):
        pass

    def stop_after_first(i):
        raise Stop(i)

    with pytest.raises(Stop):
        extract_sharded(steps, ds, ["final"], shard_size=16, batch_size=8, device="cpu", on_shard=stop_after_first)
    d = _shard_root(cache)
    assert not (d / MANIFEST).exists() and len(list(d.glob("final.*.feat"))) == 1
    first = (d / "final.000000.feat").stat()
    done = []
    out = extract_sharded(steps, ds, ["final"], shard_size=16, batch_size=8, device="cpu", on_shard=done.append)
    assert done == [1, 2]  # shard 0 was finished: not recomputed
    assert (d / "final.000000.feat").stat().st_mtime_ns == first.st_mtime_ns
    expected = extract(steps, ds, ["final"], batch_size=8, cache=False)["final"]
    np.testing.assert_array_equal(out["final"].load(), expected)
    # A corrupted shard fails its checksum: the cache is reopened only after that one shard is rebuilt.
    path = d / "final.000001.feat"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert open_shards(d) is None
    done.clear()
    again = extract_sharded(steps, ds, ["final"], shard_size=16, batch_size=8, device="cpu", on_shard=done.append)
    assert done == [1]
    np.testing.assert_array_equal(again["final"].load(), expected)


_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
import models
from experiments.data import load_dataset
from probes.features import extract_sharded
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
model = models.create_model("steps_deit_micro", num_classes=16).eval()
ds = load_dataset("hierarchy", "test", limit=40, seed=0, n=64)
stop = int(sys.argv[1]) if len(sys.argv) > 1 else -1
def on_shard(i):
    if i == stop:
        os._exit(9)  # killed after this shard: no cleanup, no manifest
extract_sharded(model, ds, ["final", "logits"], shard_size=8, batch_size=4, device="cpu", on_shard=on_shard)
if dist.is_initialized():
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: Path, cache: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO),
           "STEPSLAB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(script), *args],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_gloo_processes_write_the_same_files_as_one_and_a_killed_run_resumes(tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    one, two = tmp_path / "one", tmp_path / "two"
    proc = _run(script, one, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = _run(script, two, 2, "2")  # rank 0 dies after its second shard (shard 2): the job fails
    assert killed.returncode != 0
    d2 = _shard_root(two)
    assert not (d2 / MANIFEST).exists() and (d2 / "final.000000.feat").exists()
    before = {p.name: p.stat().st_mtime_ns for p in d2.glob("*.feat")}
    proc = _run(script, two, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all((d2 / name).stat().st_mtime_ns == t for name, t in before.items())  # finished shards kept
    d1 = _shard_root(one)
    assert d1.name == d2.name
    files1 = sorted(p.name for p in d1.iterdir() if not p.name.startswith("."))
    assert files1 == sorted(p.name for p in d2.iterdir() if not p.name.startswith("."))
    assert len(files1) == 2 * 5 + 1  # 40 examples in 5 shards of 8, two sites, the manifest
    for name in files1:
        assert (d1 / name).read_bytes() == (d2 / name).read_bytes(), name


def test_streaming_dataset_extracts_through_its_loader(steps, ds):
    """A dataset with `loader` (experiments.streaming) is read through it, shard by shard, in index order."""
    from PIL import Image

    from experiments.streaming import StreamingImages

    def read(i):
        return Image.fromarray(ds.images[i, 0].numpy())

    def transform(img):
        return ds.normalise(torch.from_numpy(np.array(img))[None])

    stream = StreamingImages(read, [str(i) for i in range(len(ds))], ds.fine.numpy(), name=ds.name, split=ds.split,
                             fine_names=ds.fine_names, coarse_names=ds.coarse_names,
                             fine_to_coarse=ds.fine_to_coarse, img_size=ds.img_size, in_chans=ds.in_chans,
                             mean=ds.mean, std=ds.std, transform=transform)
    out = extract_sharded(steps, stream, ["final"], shard_size=16, batch_size=8, device="cpu")
    ref = extract(steps, ds, ["final"], batch_size=8, cache=False)["final"]
    np.testing.assert_array_equal(out["final"].load(), ref)
