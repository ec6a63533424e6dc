"""depth: accuracy against depth at a fixed budget, DeiT (narrower when deeper) vs Steps-DeiT.

The paper's depth-scaling claim: at the same params and FLOPs a Steps model can be twice as deep as its
baseline and more accurate, and deepening keeps paying where a plain residual model, made narrower to pay for
its depth (C ~ 1/sqrt(D)), stops improving. Here both families are deepened at the MACs of one reference DeiT
(`ref_width` x `ref_depth`); for each depth D every family gets the width (a multiple of the head dim) whose MACs
(`models.counting.count_macs`, one 28x28 image) are closest to the reference's. Steps-DeiT splits D blocks over
`n_steps` steps (widths `step_widths(C', n, head_dim)`), so at equal MACs it is wider than DeiT. Params follow
MACs closely (both ~ C^2 D) and are logged beside them. Same data, optimizer steps, batch, lr schedule and
data order for every model: AdamW, warmup 5% + cosine, weight decay 0.05, no augmentation.

Metrics (s = seed, model = deit or steps, D = blocks):
    {model}.width, {model}.macs, {model}.params, {model}.macs_ratio (MACs / reference)   step = D
    seed{s}.{model}.d{D}.train_loss     mean over 25 steps; step = optimizer step
    seed{s}.{model}.d{D}.test_acc / .train_acc     after training (train: first `test_limit` training
                                        examples); step = steps
    {model}.test_acc.mean / .std, {model}.train_acc.mean / .std     across seeds; step = D
    budget.macs, budget.params          the reference DeiT
Artifacts: depth.json (configs, budgets, per-seed and mean/std accuracies), depth.png.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from experiments.data import load_dataset
from models.errors import UserError
from experiments.studies import error_rate, finish, fit, log, mean_std, study_run
from probes.runtime import resolve_device
from experiments.studies.shortcut import make_deit, make_steps_deit
from models.counting import count_macs, count_params
from models.steps import StepsStack

MODELS = ("deit", "steps")


@dataclass
class Config:
    depths: tuple[int, ...] = field(default=(4, 8, 16), metadata={"help": "Blocks (GPU: 12,24,48,96)."})
    models: tuple[str, ...] = field(default=MODELS, metadata={"help": "deit, steps or both."})
    ref_width: int = field(default=64, metadata={"help": "Width of the reference DeiT (GPU: 192)."})
    ref_depth: int = field(default=4, metadata={"help": "Depth of the reference DeiT (GPU: 12)."})
    head_dim: int = field(default=8, metadata={"help": "Attention head dim (GPU: 32 or 64)."})
    n_steps: int = field(default=3, metadata={"help": "Steps of Steps-DeiT (fewer when depth is smaller)."})
    patch_size: int = field(default=7, metadata={"help": "Patch size on 28 px (GPU: 4)."})
    steps: int = field(default=200, metadata={"help": "Optimizer steps, the same for every model."})
    batch_size: int = field(default=32, metadata={"help": "Batch size (GPU: 256)."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate."})
    dataset: str = field(default="fashion_mnist", metadata={"help": "fashion_mnist or hierarchy (1x28x28)."})
    train_limit: int = field(default=10000, metadata={"help": "Training examples (GPU: 60000)."})
    test_limit: int = field(default=2000, metadata={"help": "Test examples (GPU: 10000)."})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "Seeds (GPU: 0,1,2)."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)."})


QUICK = dict(depths=(3, 6), ref_width=32, ref_depth=3, steps=2, batch_size=8, train_limit=64, test_limit=32)


def build(name: str, width: int, depth: int, cfg: Config, in_chans: int = 1):
    if name == "deit":
        return make_deit(width, depth, cfg.head_dim, cfg.patch_size, in_chans)
    return make_steps_deit(width, depth, cfg.n_steps, cfg.head_dim, cfg.patch_size, in_chans)


def match_budget(name: str, depth: int, cfg: Config, target: int, in_chans: int = 1) -> dict:
    """The width (multiple of the head dim) whose model's MACs are closest to `target`, with its counts.

    MACs grow with width, so from C = ref_width * sqrt(ref_depth / D) (Steps: / sqrt of its cost fraction
    ~0.6) it walks one head at a time towards the target until it brackets it (2-4 models counted), skipping
    widths that cannot be split into steps.
    """
    size, counted = (in_chans, 28, 28), {}

    def at(k: int) -> dict | None:  # counts at width k * head_dim; None where that width is not valid
        if k not in counted:
            try:
                model = build(name, k * cfg.head_dim, depth, cfg, in_chans)
            except ValueError:
                counted[k] = None
            else:
                counted[k] = {"width": k * cfg.head_dim, "macs": count_macs(model, size),
                              "params": count_params(model)}
                if isinstance(model.blocks, StepsStack):
                    counted[k].update(step_widths=model.blocks.widths, step_depths=model.blocks.depths)
        return counted[k]

    def valid_from(k: int, step: int) -> int | None:  # the first valid multiple from k on, within 4 heads
        for j in range(k, k + 4 * step, step):
            if j >= 1 and at(j) is not None:
                return j
        return None

    guess = cfg.ref_width * math.sqrt(cfg.ref_depth / depth) / (math.sqrt(0.6) if name == "steps" else 1)
    k = valid_from(max(1, round(guess / cfg.head_dim)), 1)
    if k is None:
        raise UserError(f"no {name} width near {guess:.0f} splits into heads of {cfg.head_dim} at depth {depth}; "
                         "allowed: a smaller --head-dim or --n-steps")
    step = -1 if at(k)["macs"] > target else 1
    while (nxt := valid_from(k + step, step)) is not None:
        if (at(nxt)["macs"] > target) != (at(k)["macs"] > target):  # bracketed: keep the closer one
            k = min(k, nxt, key=lambda j: abs(at(j)["macs"] - target))
            break
        k = nxt
    best = dict(at(k), macs_ratio=at(k)["macs"] / target)
    return best


def check(cfg: Config) -> None:
    bad = [m for m in cfg.models if m not in MODELS]
    if bad:
        raise UserError(f"--models: unknown {bad[0]!r}; allowed: {', '.join(MODELS)}")
    if min(cfg.ref_width, cfg.ref_depth, cfg.head_dim, cfg.n_steps, cfg.patch_size) < 1:
        raise UserError("--ref-width, --ref-depth, --head-dim, --n-steps, --patch-size: allowed: positive integers")


def run(cfg: Config) -> dict:
    """Match budgets, train every model at every depth and seed, log accuracies; returns the results."""
    check(cfg)
    device = resolve_device(cfg.device)
    train = load_dataset(cfg.dataset, "train", limit=cfg.train_limit)
    test = load_dataset(cfg.dataset, "test", limit=cfg.test_limit)
    train_eval = train.subset(range(min(len(train), cfg.test_limit)))
    started = time.time()
    ref = make_deit(cfg.ref_width, cfg.ref_depth, cfg.head_dim, cfg.patch_size, train.in_chans)
    budget = {"width": cfg.ref_width, "depth": cfg.ref_depth,
              "macs": count_macs(ref, (train.in_chans, 28, 28)), "params": count_params(ref)}
    table = {m: {str(d): match_budget(m, d, cfg, budget["macs"], train.in_chans) for d in cfg.depths}
             for m in cfg.models}
    with study_run("depth", cfg) as mlrun:
        log({"budget.macs": budget["macs"], "budget.params": budget["params"]})
        for m, rows in table.items():
            for d, row in rows.items():
                log({f"{m}.{k}": row[k] for k in ("width", "macs", "params", "macs_ratio")}, step=int(d))
                row.update(train_acc=[], test_acc=[])
        total = len(cfg.seeds) * len(cfg.models) * len(cfg.depths) * cfg.steps
        with tqdm(total=total, desc="depth", unit="step", disable=None) as bar:
            for seed in cfg.seeds:
                for d in cfg.depths:
                    for m in cfg.models:
                        row, prefix = table[m][str(d)], f"seed{seed}.{m}.d{d}"
                        bar.set_postfix_str(f"{prefix} width {row['width']}")
                        torch.manual_seed(seed)
                        model = build(m, row["width"], d, cfg, train.in_chans)
                        fit(model, train, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                            device=device, weight_decay=0.05, metric_prefix=prefix, bar=bar)
                        tr, te = 1 - error_rate(model, train_eval, device), 1 - error_rate(model, test, device)
                        row["train_acc"].append(tr)
                        row["test_acc"].append(te)
                        log({f"{prefix}.train_acc": tr, f"{prefix}.test_acc": te}, step=cfg.steps)
        for m, rows in table.items():
            for d, row in rows.items():
                for key in ("train_acc", "test_acc"):
                    row[f"{key}_mean"], row[f"{key}_std"] = mean_std(row[key])
                    log({f"{m}.{key}.mean": row[f"{key}_mean"], f"{m}.{key}.std": row[f"{key}_std"]}, step=int(d))
        results = {"study": "depth", "config": cfg.__dict__, "device": str(device), "budget": budget,
                   "results": table, "summary": summary(cfg, budget, table)}
        finish("depth", results, plot(cfg, table), started)
        results["run_id"] = mlrun.info.run_id
    return results


def summary(cfg: Config, budget: dict, table: dict) -> list[str]:
    lines = [f"budget: DeiT {cfg.ref_width}x{cfg.ref_depth}, {budget['macs'] / 1e6:.2f}M MACs, "
             f"{budget['params'] / 1e3:.0f}k params; test accuracy (train accuracy) after {cfg.steps} steps, "
             f"mean+-std over seeds {list(cfg.seeds)}:"]
    for m, rows in table.items():
        for d, r in rows.items():
            widths = r.get("step_widths", r["width"])
            lines.append(f"  {m:5s} D={d:>3s} width {widths}: MACs x{r['macs_ratio']:.2f}, params "
                         f"{r['params'] / 1e3:.0f}k, test {r['test_acc_mean']:.3f}+-{r['test_acc_std']:.3f} "
                         f"(train {r['train_acc_mean']:.3f})")
    return lines


def plot(cfg: Config, table: dict):
    """Test and training accuracy against depth, one line per family (error bars: std over seeds)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("test_acc", "train_acc")):
        for m, rows in table.items():
            depths, rs = [int(d) for d in rows], list(rows.values())
            ax.errorbar(depths, [r[f"{key}_mean"] for r in rs], yerr=[r[f"{key}_std"] for r in rs], marker="o",
                        capsize=3, label=f"{m} (widths {', '.join(str(r['width']) for r in rs)})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(cfg.depths), [str(d) for d in cfg.depths])
        ax.set(xlabel="blocks", ylabel=key.replace("_", " "),
               title=f"{key.replace('_acc', '')} accuracy at {cfg.ref_width}x{cfg.ref_depth} DeiT MACs")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
