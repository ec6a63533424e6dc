"""GPU check: train Steps-DeiT-T and DeiT-T for the same short time on the same data on one GPU, and record
throughput, peak memory and accuracy (fine and coarse) as JSON and Markdown.

    python -m experiments.gpu_check [--budget-s 60] [--data-dir DIR] [--out experiments/results]

Setting: 28 x 28 grey images, patch 4 (7 x 7 tokens + class token), as the micro research configs; the paper's
T widths and depths (`steps_deit_t`, `deit_t`) with `img_size=28, patch_size=4, in_chans=1`. Data: Fashion-MNIST
from `--data-dir` (the IDX files; default: Debian's folder) when present, else the generated `hierarchy`
dataset (28 px, 24000 train / 4000 test). Each model first trains `--calib-steps` steps to measure its speed,
then trains from scratch for as many whole epochs as fit `--budget-s` seconds (so the LR schedule finishes),
with a hard stop at 1.3 x budget. Both models see the same images in the same order (same seed).

Runs with only torch, timm, numpy and tqdm installed: it uses `experiments.train.fit` (the training loop of
`probe train`) with tracking off. Writes `<out>/gpu-check-<card>.json` and `.md`. Total time on one H100 with
the defaults: about 2 x (budget + 15 s) + start-up, under 3 minutes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as experiments/train.py: before torch loads OpenMP

import torch  # noqa: E402

from experiments.bench.harness import slug, sync  # noqa: E402  (results files are named as the bench's)
from experiments.data import FASHION_MNIST_DIR, load_dataset  # noqa: E402
from experiments.train import (TrainConfig, evaluate, fit, init_distributed, load_data, prepare,  # noqa: E402
                               steps_per_epoch)

MODELS = ("steps_deit_t", "deit_t")
MODEL_KWARGS = {"patch_size": 4}
HIERARCHY = {"n": 24000, "img_size": 28, "channels": 1}
HIERARCHY_TEST_N = 4000


def _has_idx(folder: str | None) -> bool:
    root = Path(folder or FASHION_MNIST_DIR)
    return all(any((root / f"{stem}{ext}").is_file() for ext in (".gz", ""))
               for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                            "t10k-labels-idx1-ubyte"))


def base_config(args: argparse.Namespace, model: str) -> TrainConfig:
    """The TrainConfig both models share, but for the model name (tracking and registry off)."""
    if _has_idx(args.data_dir):
        data = dict(dataset="fashion_mnist", data_dir=args.data_dir or FASHION_MNIST_DIR, data_options={})
    else:
        data = dict(dataset="hierarchy", data_dir=None, data_options=dict(HIERARCHY))
    return TrainConfig(model=model, epochs=1, batch_size=args.batch_size, lr=args.lr, weight_decay=0.05,
                       warmup_epochs=args.warmup_epochs, label_smoothing=0.1, clip_grad=1.0, drop_path=0.0,
                       limit=args.limit, test_limit=args.test_limit, seed=args.seed, device=args.device,
                       compile=args.compile, register=False, model_kwargs=dict(MODEL_KWARGS),
                       log_every=50, **data)


def _load(cfg: TrainConfig):
    """Train and test splits (as `probe train` loads them); the hierarchy test split has HIERARCHY_TEST_N images."""
    if cfg.dataset != "hierarchy":
        return load_data(cfg)
    train_ds = load_dataset("hierarchy", "train", limit=cfg.limit, seed=cfg.seed, **cfg.data_options)
    test_ds = load_dataset("hierarchy", "test", limit=cfg.test_limit, seed=cfg.seed,
                           **{**cfg.data_options, "n": HIERARCHY_TEST_N})
    return train_ds, test_ds


def run_model(cfg: TrainConfig, args: argparse.Namespace, train_ds, test_ds, device: torch.device) -> dict:
    """Calibrate, then train `cfg.model` for the budget (or `args.max_steps`), evaluate, and measure."""
    spe = steps_per_epoch(len(train_ds), cfg.batch_size)
    calib = None
    if args.max_steps is not None:
        cfg = dataclasses.replace(cfg, epochs=max(1, math.ceil(args.max_steps / spe)), max_steps=args.max_steps)
    else:
        # A few warm-up steps (CUDA context, cuBLAS/cuDNN set-up), then the timed calibration steps.
        warm_cfg = dataclasses.replace(cfg, epochs=1, max_steps=min(5, spe))
        state = prepare(warm_cfg, train_ds, device)
        fit(warm_cfg, state, train_ds, device, progress=False)
        t_warm, n_warm = state.train_time_s, state.images
        cal_cfg = dataclasses.replace(warm_cfg, max_steps=min(5 + args.calib_steps, spe))
        fit(cal_cfg, state, train_ds, device, progress=False)
        calib = (state.images - n_warm) / max(state.train_time_s - t_warm, 1e-9)
        del state
        epochs = max(1, int(args.budget_s * calib / (spe * cfg.batch_size)))
        cfg = dataclasses.replace(cfg, epochs=epochs)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    state = prepare(cfg, train_ds, device)

    def on_epoch(st, train_loss: float) -> None:
        print(f"{cfg.model} epoch {st.epoch}/{cfg.epochs}: train loss {train_loss:.4f},"
              f" {st.images / max(st.train_time_s, 1e-9):.0f} img/s", flush=True)

    t0 = time.perf_counter()
    stopped = fit(cfg, state, train_ds, device, on_epoch=on_epoch,
                  time_limit_s=None if args.max_steps else 1.3 * args.budget_s)
    sync(device)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    ev = evaluate(state.model, test_ds, device, batch_size=512)
    sync(device)
    eval_s = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "model": cfg.model, "params_m": round(sum(p.numel() for p in state.model.parameters()) / 1e6, 3),
        "epochs_planned": cfg.epochs, "epochs_done": round(state.step / spe, 3), "steps": state.step,
        "stopped_early": stopped, "train_s": round(state.train_time_s, 2), "wall_s": round(wall, 2),
        "train_images_per_s": round(state.images / max(state.train_time_s, 1e-9), 1),
        "calib_images_per_s": None if calib is None else round(calib, 1),
        "eval_images_per_s": round(len(test_ds) / max(eval_s, 1e-9), 1),
        "peak_memory_mib": None if peak is None else round(peak, 1),
        "fine_acc": round(ev["fine_acc"], 4), "coarse_acc": round(ev["coarse_acc"], 4),
        "test_loss": round(ev["loss"], 4),
    }


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def markdown(report: dict) -> str:
    """The report as a short Markdown page: setting, then one row per model."""
    s = report["setting"]
    lines = [f"# GPU check: {report['card']}", "",
             f"{report['date']} - torch {report['torch']}, CUDA {report['cuda']}, {report['dtype']}, "
             f"compile {s['compile']}", "",
             f"Data: {s['dataset']} ({s['train_images']} train / {s['test_images']} test, {s['img_size']} px, "
             f"{s['in_chans']} channel(s), {s['num_fine']} fine / {s['num_coarse']} coarse classes). "
             f"Batch {s['batch_size']}, lr {s['lr']}, warmup {s['warmup_epochs']} epochs, cosine; budget "
             f"{s['budget_s']} s per model; seed {s['seed']}; models with {json.dumps(s['model_kwargs'])}.", "",
             "| model | params M | epochs | steps | train img/s | eval img/s | peak MiB | fine acc | coarse acc "
             "| test loss | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {r['params_m']} | {r['epochs_done']} | {r['steps']} | "
                     f"{r['train_images_per_s']} | {r['eval_images_per_s']} | {r['peak_memory_mib']} | "
                     f"{r['fine_acc']} | {r['coarse_acc']} | {r['test_loss']} | {r['train_s']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=60.0, help="training seconds per model (default 60)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder; hierarchy when absent")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--device", default="auto")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--calib-steps", type=int, default=40)
    p.add_argument("--max-steps", type=int, default=None, help="train this many steps instead of the budget")
    p.add_argument("--compile", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    _, device = init_distributed(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    cfg0 = base_config(args, names[0])
    train_ds, test_ds = _load(cfg0)
    print(f"data: {train_ds!r}, {test_ds!r}; device {card_name(device)}", flush=True)
    results = []
    for name in names:
        results.append(run_model(dataclasses.replace(cfg0, model=name), args, train_ds, test_ds, device))
        print(json.dumps(results[-1]), flush=True)
    card = card_name(device)
    report = {
        "card": card, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
        "cuda": torch.version.cuda, "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
        "setting": {"dataset": cfg0.dataset, "data_options": cfg0.data_options, "train_images": len(train_ds),
                    "test_images": len(test_ds), "img_size": train_ds.img_size, "in_chans": train_ds.in_chans,
                    "num_fine": train_ds.num_fine, "num_coarse": train_ds.num_coarse,
                    "batch_size": args.batch_size, "lr": args.lr, "warmup_epochs": args.warmup_epochs,
                    "budget_s": args.budget_s, "max_steps": args.max_steps, "seed": args.seed,
                    "compile": args.compile, "model_kwargs": MODEL_KWARGS},
        "results": results, "total_s": None,
    }
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu-check-{slug(card)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem}.json and {stem}.md in {report['total_s']} s", flush=True)
    return report


if __name__ == "__main__":
    main()
