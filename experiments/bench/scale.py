"""scale: issue 13's scale numbers on this machine.

- Extraction: images/s of `probes.features.extract_sharded` (steps_deit_micro, untrained: speed does not depend
  on the weights) over a generated hierarchy set, with 1 and 2 torchrun processes (gloo, one thread each so the
  two runs use the same cores per process), timed inside the job from the first shard to the manifest; and
  whether the two caches are byte-identical (they must be).
- Peak memory of `probe train` on generated 224 px JPEG folders of two sizes (experiments.peak_memory's folders
  and sampler), the growth per extra image, and the data-wait share of those runs (from their MLflow runs in a
  temporary store). Skipped, with a note, when the budget is short.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from experiments.bench.harness import Setup, log

MODEL = "steps_deit_micro"
REPO = Path(__file__).resolve().parents[2]
_SCRIPT = """
import json, os, sys, time
import torch, torch.distributed as dist
import models
from experiments.data import load_dataset
from probes.features import extract_sharded
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
model = models.create_model("{model}", num_classes=16).eval()
ds = load_dataset("hierarchy", "train", n={n}, seed=0)
if dist.is_initialized():
    dist.barrier()
t0 = time.perf_counter()
extract_sharded(model, ds, ["final"], shard_size={shard}, batch_size=64, device="cpu")
if int(os.environ.get("RANK", "0")) == 0:
    print(json.dumps({{"s": time.perf_counter() - t0, "n": len(ds)}}))
if dist.is_initialized():
    dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extraction(n: int = 2048, shard: int = 256) -> dict:
    """{"n", "ips_1", "ips_2", "speedup", "identical"}: extraction with 1 and 2 processes over `n` images."""
    res: dict = {"n": n, "model": MODEL, "shard_size": shard}
    with tempfile.TemporaryDirectory(prefix="stepslab-bench-scale-") as tmp:
        script = Path(tmp) / "extract.py"
        script.write_text(textwrap.dedent(_SCRIPT.format(model=MODEL, n=n, shard=shard)))
        dirs = {}
        for nproc in (1, 2):
            cache = Path(tmp) / f"cache-{nproc}"
            env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO),
                   "STEPSLAB_CACHE": str(cache)}
            log(f"scale: extraction of {n} images with {nproc} process(es)")
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                   f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(script)],
                                  env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode:
                raise RuntimeError(f"extraction with {nproc} processes failed: {proc.stderr[-2000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            res[f"ips_{nproc}"] = out["n"] / out["s"]
            (dirs[nproc],) = (cache / "shards").iterdir()
            log(f"scale: {nproc} process(es) {res[f'ips_{nproc}']:.0f} images/s")
        files = sorted(p.name for p in dirs[1].iterdir() if not p.name.startswith("."))
        res["identical"] = files == sorted(p.name for p in dirs[2].iterdir() if not p.name.startswith(".")) and all(
            (dirs[1] / f).read_bytes() == (dirs[2] / f).read_bytes() for f in files)
    res["speedup"] = res["ips_2"] / res["ips_1"]
    return res


def memory(sizes: tuple[int, int] = (200, 1000), img: int = 224, steps: int = 20) -> dict:
    """Peak RSS of `probe train --dataset imagefolder` (resnet_micro, `steps` steps) on two generated folders."""
    from mlflow import MlflowClient

    from experiments.peak_memory import make_folder, peak_rss_kb

    probe = str(Path(sys.executable).with_name("probe"))
    res: dict = {"sizes": list(sizes), "img": img, "rows": []}
    with tempfile.TemporaryDirectory(prefix="stepslab-bench-rss-") as tmp:
        home = Path(tmp) / "home"
        env = dict(os.environ, STEPSLAB_HOME=str(home))
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("STEPSLAB_CACHE", None)
        args = ["--model", "resnet_micro", "--max-steps", str(steps), "--epochs", "1", "--batch-size", "32",
                "--workers", "2", "--no-register"]
        res["command"] = "probe train --dataset imagefolder --data-dir DIR " + " ".join(args)
        for n in sizes:
            folder = make_folder(Path(tmp) / f"folder-{n}", n, img)
            log(f"scale: peak RSS of probe train on {n} images")
            cmd = [probe, "train", "--dataset", "imagefolder", "--data-dir", str(folder),
                   "--checkpoint-dir", str(Path(tmp) / f"ck-{n}"), *args]
            tree, main_kb, rc = peak_rss_kb(cmd, env)
            if rc:
                raise RuntimeError(f"probe train on {n} images exited {rc}")
            res["rows"].append({"n": n, "tree_mib": tree / 1024, "main_mib": main_kb / 1024})
        (a, b) = res["rows"][0], res["rows"][-1]
        # KB (1000 bytes) per extra image; the tree's sum moves with the workers' lifetimes, so both are kept.
        res["kb_per_image"] = (b["tree_mib"] - a["tree_mib"]) * 1024 * 1.024 / (b["n"] - a["n"])
        res["kb_per_image_main"] = (b["main_mib"] - a["main_mib"]) * 1024 * 1.024 / (b["n"] - a["n"])
        try:  # the data-wait share each run logged, read back from the temporary store
            client = MlflowClient(f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            res["data_wait_share"] = [r.data.metrics.get("final/data_wait_share",
                                                          r.data.metrics.get("train/data_wait_share"))
                                      for r in runs]
        except Exception as exc:  # noqa: BLE001 - a missing number is a note, not a failed section
            res["data_wait_share"] = None
            res["data_wait_note"] = f"not read back ({type(exc).__name__})"
    return res


def run(setup: Setup, notes: list[str], n: int = 2048) -> dict:
    """The scale section's numbers (module docstring); the memory part only with > 10 min of budget left."""
    t0 = time.perf_counter()
    res = {"extraction": extraction(n), "device": setup.slug}
    res["extraction"]["wall_s"] = time.perf_counter() - t0
    if setup.device.type == "cuda":
        notes.append("scale: extraction runs on the CPU with gloo (the GPU device script is separate)")
    if setup.left() > 600:
        res["memory"] = memory()
    else:
        notes.append("scale: peak RSS part skipped, under 10 minutes of budget left")
    return res
