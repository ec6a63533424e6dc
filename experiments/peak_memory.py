"""Peak memory of `probe train` against the number of images in an image folder (issue 13's done criterion).

    python -m experiments.peak_memory --sizes 400,2400 --img 224 -- --model resnet_micro --max-steps 20 ...

Generates one folder of 224 px JPEGs per size (10 classes, `train/` of that size, the same 100-image `test/`),
runs the same `probe train --dataset imagefolder --data-dir <folder> <args>` on each, samples the resident memory
of the whole process tree (the command and its DataLoader workers) every 50 ms from /proc (Linux), and prints
the peaks and the growth per extra image. Nothing is logged to the project's store: runs go to a temporary
STEPSLAB_HOME.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(root: Path, n_train: int, size: int, n_test: int = 100, classes: int = 10) -> Path:
    """`root/train/c<k>/*.jpg` (n_train images) and `root/test/c<k>/*.jpg` (n_test), noise with a class colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            k = i % classes
            (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
            a = (rng.random((size // 4, size // 4, 3)) * 160).astype(np.uint8)
            a[..., k % 3] += 90
            Image.fromarray(a).resize((size, size), Image.BILINEAR).save(root / split / f"c{k}" / f"{i}.jpg",
                                                                         quality=90)
    return root


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kb(cmd: list[str], env: dict) -> tuple[int, int, int]:
    """Run `cmd`; return (peak summed RSS of its process tree, peak RSS of the main process, exit status), KiB."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_tree = peak_main = 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        peak_tree = max(peak_tree, sum(_rss_kb(p) for p in pids))
        peak_main = max(peak_main, _rss_kb(proc.pid))
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode:
        sys.stderr.write(err[-3000:])
    return peak_tree, peak_main, proc.returncode


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="400,2400", help="Train images in the two folders.")
    ap.add_argument("--img", type=int, default=224, help="Side of the generated JPEGs.")
    ap.add_argument("--keep", default=None, help="Make the folders here (and keep them).")
    ap.add_argument("train_args", nargs="*", help="Arguments after -- go to probe train.")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    probe = str(Path(sys.executable).with_name("probe"))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        env = dict(os.environ, STEPSLAB_HOME=str(Path(tmp) / "home"))
        env.pop("MLFLOW_TRACKING_URI", None)
        rows = []
        for n in sizes:
            folder = base / f"folder-{n}"
            if not (folder / "train").is_dir():
                make_folder(folder, n, args.img)
            cmd = [probe, "train", "--dataset", "imagefolder", "--data-dir", str(folder),
                   "--checkpoint-dir", str(Path(tmp) / f"ck-{n}"), "--no-register", *args.train_args]
            tree, main_kb, rc = peak_rss_kb(cmd, env)
            rows.append((n, tree, main_kb, rc))
            print(f"{n} images: peak RSS {tree / 1024:.1f} MiB (process tree), {main_kb / 1024:.1f} MiB (main), "
                  f"exit {rc}", flush=True)
        (n0, t0, m0, _), (n1, t1, m1, _) = rows[0], rows[-1]
        print(f"growth per extra image: {(t1 - t0) * 1.024 / (n1 - n0):.2f} KB (tree), "
              f"{(m1 - m0) * 1.024 / (n1 - n0):.2f} KB (main); command: probe train --dataset imagefolder "
              f"--data-dir DIR {' '.join(args.train_args)}")


if __name__ == "__main__":
    main()
