"""Peak CPU memory of one training step (forward + backward) with and without gradient checkpointing.

    .venv/bin/python tests/models/grad_ckpt_memory.py steps_deit_s --batch 16

Each setting runs in a fresh process. Peak memory is the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after the model and batch are built) minus the resident set at that point; "saved" is
what autograd keeps for backward (bytes packed by `saved_tensors_hooks`, a tensor saved twice counted twice;
with checkpointing, only the checkpoints' inputs and the ops outside them). Not a test: pytest collects
test_*.py only.

Measured on the shared 2-core CPU VM (torch 2.14.1, timm 1.0.31, fp32, 224 px, batch 16, one run each):

    steps_deit_s    checkpointing off: peak +1377 MiB, saved 1342 MiB, 7.8 s
                    checkpointing on:  peak  +539 MiB, saved   90 MiB, 8.5 s
    steps_swin_t    checkpointing off: peak +2431 MiB, saved 2271 MiB, 12.6 s
                    checkpointing on:  peak +1480 MiB, saved  212 MiB, 10.7 s
    steps_resnet50  checkpointing off: peak +2106 MiB, saved 2543 MiB, 7.9 s
                    checkpointing on:  peak +1124 MiB, saved  633 MiB, 6.9 s

Checkpointing keeps the gradients, one block's recomputed activations at a time and what runs outside the
blocks (ResNet's stem, Swin's patch merging). Times on this VM vary by +-20% between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MiB = 2 ** 20


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(name: str, batch: int, checkpointing: bool) -> dict:
    """One training step of `name` in this process; peak resident memory growth and autograd's saved bytes."""
    import timm
    import torch

    import models  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.0).train()
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(batch, *model.default_cfg["input_size"])
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = _rss_bytes("VmRSS")
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    return {"model": name, "batch": batch, "checkpointing": checkpointing,
            "peak_mib": round((_rss_bytes("VmHWM") - before) / MiB), "saved_mib": round(saved[0] / MiB),
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="steps_deit_s")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.batch, args.one == "on")))
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")  # no busy-waiting threads on a shared machine
    for setting in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, args.model, "--batch", str(args.batch), "--one", setting],
                             check=True, capture_output=True, text=True, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['model']}  batch {r['batch']}  checkpointing {setting}: peak +{r['peak_mib']} MiB, "
              f"saved {r['saved_mib']} MiB, {r['seconds']} s")


if __name__ == "__main__":
    main()
