"""shortcut: the paper's shortcut ratio and input Jacobian, DeiT (timm ViT) vs Steps-DeiT, through training.

The residual stream z_l = z_0 + sum_{i<=l} R_i; a pre-LN block sees z^_l = LN(z_l) = (sigma_0/sigma_l) z^_0 + ...
The shortcut ratio gamma_l = sigma(z_0) / sigma(z_l) says how much of the input still reaches block l + 1; the
paper reports it falls toward 0 with depth and training, and with it ||dz^_l / dz^_0||.

Definitions (all tokens, class token included, of a fixed probe batch of test images):
    z_0        the stream input: tokens after patch + position embedding (the input of `model.blocks`)
    z_l        the stream after l blocks: site `blocks.{l-1}` (models.sites), l = 1..L
    sigma(z)   sqrt(mean over tokens of the per-token variance over channels): the LayerNorm scale, pooled
    gamma_l    sigma(z_0[..., :C_l]) / sigma(z_l), C_l the width at block l (C for DeiT); gamma_0 = 1
    jac_l      ||J^T v|| / ||v||, J = dz^_l/dz^_0, v ~ N(0, I) over z^_l, z^ = LayerNorm without affine. Its
               square estimates ||J||_F^2 / dim(z^_l), the mean squared singular value: 1 for the identity,
               -> 0 when the input is drowned. Averaged over `probes` random v.
Steps-DeiT, per step i (0-based), on the channels [C_{i-1}, C_i) that entered at step i (site
`stages.0.steps.{i}.x`): gamma^(i)_l = sigma(x_i) / sigma(z_l[..., C_{i-1}:C_i]) and jac^(i)_l on the same
channels of z^_l and z^_0, for every l from the step's entry point (l = blocks before step i; gamma = 1).

Models: DeiT = timm `vit_tiny_patch16_224` at width C, depth D, C / head_dim heads; Steps-DeiT =
`steps_deit_micro` with widths `step_widths(C, n_steps, head_dim)` and D blocks split over the steps (same
width and depth; Steps has fewer parameters). Both on 28x28 grey images, patch `patch_size`. Training: AdamW,
warmup 5% + cosine, weight decay 0.05, measured at the `checkpoints` (optimizer steps; 0 = init).

Metrics (s = seed, model = deit.d{D} or steps.d{D}, step = optimizer step of the checkpoint):
    seed{s}.{model}.gamma.z{l}, l = 0..L          seed{s}.{model}.jac.z{l}, l = 1..L
    seed{s}.{model}.step{i}.gamma.z{l}            seed{s}.{model}.step{i}.jac.z{l}      (Steps-DeiT only)
    seed{s}.{model}.train_loss (mean over 25 steps), seed{s}.{model}.test_error (step = steps)
    {model}.gamma.z{l}.mean / .std, {model}.jac.z{l}.mean / .std, and the step{i} ones, across seeds
    {model}.params (step 0)
Artifacts: shortcut.json (every checkpoint, per seed and mean/std), shortcut.png.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from experiments.data import load_dataset
from models.errors import UserError
from experiments.studies import error_rate, finish, fit, log, mean_std, split_depth, study_run
from probes.runtime import resolve_device
from models.sites import site_modules
from models.steps import StepsStack, step_widths

MODELS = ("deit", "steps")


@dataclass
class Config:
    depths: tuple[int, ...] = field(default=(12, 24), metadata={"help": "Blocks (GPU: 12,24,48,96)."})
    models: tuple[str, ...] = field(default=MODELS, metadata={"help": "deit, steps or both."})
    width: int = field(default=64, metadata={"help": "Model width C (GPU: 192 or 384)."})
    head_dim: int = field(default=16, metadata={"help": "Attention head dim (GPU: 64)."})
    n_steps: int = field(default=3, metadata={"help": "Steps of Steps-DeiT (GPU: 4)."})
    patch_size: int = field(default=7, metadata={"help": "Patch size on 28 px (4 = the micro configs)."})
    steps: int = field(default=100, metadata={"help": "Optimizer steps of the short training."})
    checkpoints: tuple[int, ...] = field(default=(0, 10, 25, 50, 100),
                                         metadata={"help": "Optimizer steps at which to measure (0 = init)."})
    batch_size: int = field(default=32, metadata={"help": "Batch size."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate."})
    probe_batch: int = field(default=16, metadata={"help": "Test images the measurements use."})
    probes: int = field(default=1, metadata={"help": "Random vectors per Jacobian estimate."})
    dataset: str = field(default="fashion_mnist", metadata={"help": "fashion_mnist or hierarchy (1x28x28)."})
    train_limit: int = field(default=10000, metadata={"help": "Training examples."})
    test_limit: int = field(default=1000, metadata={"help": "Test examples (test error after training)."})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "Seeds (init, data order, probe vectors)."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)."})


QUICK = dict(depths=(3,), width=32, head_dim=8, steps=2, checkpoints=(0, 2), batch_size=8, probe_batch=4,
             train_limit=64, test_limit=32)


# ---------------------------------------------------------------------------------------------- models


def make_deit(width: int, depth: int, head_dim: int, patch_size: int, in_chans: int = 1, img_size: int = 28,
              num_classes: int = 10) -> nn.Module:
    """timm's DeiT-style ViT (`vit_tiny_patch16_224`) at any width / depth, heads of `head_dim`."""
    import timm

    if width % head_dim:
        raise UserError(f"width {width} is not a multiple of head dim {head_dim}")
    return timm.create_model("vit_tiny_patch16_224", embed_dim=width, depth=depth, num_heads=width // head_dim,
                             patch_size=patch_size, img_size=img_size, in_chans=in_chans, num_classes=num_classes)


def make_steps_deit(width: int, depth: int, n_steps: int, head_dim: int, patch_size: int, in_chans: int = 1,
                    img_size: int = 28, num_classes: int = 10) -> nn.Module:
    """Steps-DeiT (`steps_deit_micro` with overrides): widths step_widths(width, n, head_dim), `depth` blocks
    split over n = min(n_steps, depth) steps."""
    import timm

    import models  # noqa: F401  (registers steps_deit_micro)

    n = min(n_steps, depth)
    return timm.create_model("steps_deit_micro", step_widths=tuple(step_widths(width, n, head_dim)),
                             step_depths=tuple(split_depth(depth, n)), head_dim=head_dim, patch_size=patch_size,
                             img_size=img_size, in_chans=in_chans, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------- measures


def token_std(z: torch.Tensor) -> torch.Tensor:
    """sigma(z): sqrt of the per-token variance over channels (last axis), averaged over all tokens."""
    return z.float().var(dim=-1, unbiased=False).mean().sqrt()


def shortcut_ratio(z0: torch.Tensor, zl: torch.Tensor) -> float:
    """gamma = sigma(z0) / sigma(zl) (see `token_std`)."""
    return float(token_std(z0.detach()) / token_std(zl.detach()))


def _vjp_norm(out: torch.Tensor, u: torch.Tensor, z0: torch.Tensor, ch: slice, gen: torch.Generator,
              probes: int) -> float:
    """Mean over `probes` of ||J^T v|| / ||v||, J = d out[..., ch] / d z^0[..., ch], where z^0[..., ch] is z0's
    channels `ch` normalised on their own, v ~ N(0, I) on the channels `ch` of `out` (zero elsewhere).

    `u` is z0 normalised over all channels (the leaf the forward pass was built on); per token,
    d u[ch] / d z^0[ch] = sd(z0[ch]) / sd(z0), so the gradient read on u[..., ch] is rescaled by that.
    """
    scale = z0[..., ch].std(-1, unbiased=False, keepdim=True) / z0.std(-1, unbiased=False, keepdim=True)
    mask = torch.zeros(out.shape[-1], device=out.device)
    mask[ch] = 1
    total = 0.0
    for _ in range(probes):
        v = torch.randn(out.shape, generator=gen).to(out.device) * mask
        (g,) = torch.autograd.grad(out, u, v, retain_graph=True)
        total += float((g[..., ch] * scale).norm() / v.norm())
    return total / probes


def measure(model: nn.Module, images: torch.Tensor, probes: int = 1, seed: int = 0) -> dict:
    """gamma_l and jac_l for every block of `model` on `images`, and per step for a Steps model.

    Returns {"gamma": [gamma_0 .. gamma_L], "jac": [jac_1 .. jac_L]} plus, for Steps models,
    {"steps": [{"entry": l_i, "channels": [a, b], "gamma": [...from l_i], "jac": [...from l_i + 1]}, ...]}.
    """
    was_training = model.training
    model.eval()
    sites = site_modules(model)
    blocks = [sites[f"blocks.{k}"] for k in range(sum(n.startswith("blocks.") for n in sites))]
    stack = model.blocks
    store: dict = {"z": []}

    def stream_input(module, args):
        # Re-express z0 through its normalised version u (a leaf), so gradients can be read per channel group.
        z0 = args[0].detach()
        mu, sd = z0.mean(-1, keepdim=True), z0.std(-1, unbiased=False, keepdim=True)
        store["z0"], store["u"] = z0, ((z0 - mu) / sd).requires_grad_()
        return (store["u"] * sd + mu,)

    handles = [stack.register_forward_pre_hook(stream_input)]
    handles += [b.register_forward_hook(lambda m, a, out: store["z"].append(out)) for b in blocks]
    steps = stack.steps if isinstance(stack, StepsStack) else []
    for i, step in enumerate(steps):
        handles.append(step.x.register_forward_hook(lambda m, a, out, i=i: store.__setitem__(f"x{i}", out)))
    try:
        with torch.enable_grad():
            model(images)
            z0, u, zs = store["z0"], store["u"], store["z"]
            gen = torch.Generator().manual_seed(seed)
            hats = [F.layer_norm(z, z.shape[-1:], eps=1e-6) for z in zs]
            out = {"gamma": [1.0] + [shortcut_ratio(z0[..., :z.shape[-1]], z) for z in zs],
                   "jac": [_vjp_norm(h, u, z0, slice(0, h.shape[-1]), gen, probes) for h in hats]}
            if steps:
                out["steps"], entry, start = [], 0, 0
                for i, (width, depth) in enumerate(zip(stack.widths, stack.depths)):
                    ch, x = slice(start, width), store[f"x{i}"]
                    later = range(entry, len(zs))
                    out["steps"].append({
                        "entry": entry, "channels": [start, width],
                        "gamma": [1.0] + [shortcut_ratio(x, zs[l][..., ch]) for l in later],
                        "jac": [_vjp_norm(hats[l], u, z0, ch, gen, probes) for l in later]})
                    entry, start = entry + depth, width
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out


def metrics_of(prefix: str, m: dict) -> dict[str, float]:
    """Flatten one `measure` result into metric names (see the module docstring)."""
    out = {f"{prefix}.gamma.z{l}": g for l, g in enumerate(m["gamma"])}
    out.update({f"{prefix}.jac.z{l + 1}": j for l, j in enumerate(m["jac"])})
    for i, s in enumerate(m.get("steps", [])):
        out.update({f"{prefix}.step{i}.gamma.z{s['entry'] + l}": g for l, g in enumerate(s["gamma"])})
        out.update({f"{prefix}.step{i}.jac.z{s['entry'] + l + 1}": j for l, j in enumerate(s["jac"])})
    return out


# ---------------------------------------------------------------------------------------------- study


def check(cfg: Config) -> None:
    bad = [m for m in cfg.models if m not in MODELS]
    if bad:
        raise UserError(f"--models: unknown {bad[0]!r}; allowed: {', '.join(MODELS)}")
    if any(c < 0 or c > cfg.steps for c in cfg.checkpoints):
        raise UserError(f"--checkpoints {cfg.checkpoints}: allowed: optimizer steps 0..{cfg.steps}")
    if min(cfg.head_dim, cfg.n_steps, cfg.patch_size, cfg.probe_batch, cfg.probes) < 1:
        raise UserError("--head-dim, --n-steps, --patch-size, --probe-batch, --probes: allowed: positive integers")


def build(name: str, cfg: Config, depth: int, in_chans: int) -> nn.Module:
    if name == "deit":
        return make_deit(cfg.width, depth, cfg.head_dim, cfg.patch_size, in_chans)
    return make_steps_deit(cfg.width, depth, cfg.n_steps, cfg.head_dim, cfg.patch_size, in_chans)


def run(cfg: Config) -> dict:
    """Measure and train every model at every depth and seed; returns the results (module docstring)."""
    check(cfg)
    device = resolve_device(cfg.device)
    train = load_dataset(cfg.dataset, "train", limit=cfg.train_limit)
    test = load_dataset(cfg.dataset, "test", limit=cfg.test_limit)
    for name in cfg.models:  # fail before the run starts on widths that cannot be split
        for d in cfg.depths:
            build(name, cfg, d, train.in_chans)
    probe = test.normalise(test.images[:cfg.probe_batch]).to(device)
    checkpoints = sorted(set(cfg.checkpoints))
    started = time.time()
    per_seed = {f"{m}.d{d}": [] for d in cfg.depths for m in cfg.models}
    params = {}
    with study_run("shortcut", cfg) as mlrun:
        total = len(cfg.seeds) * len(per_seed) * cfg.steps
        with tqdm(total=total, desc="shortcut", unit="step", disable=None) as bar:
            for seed in cfg.seeds:
                for d in cfg.depths:
                    for name in cfg.models:
                        key, prefix = f"{name}.d{d}", f"seed{seed}.{name}.d{d}"
                        torch.manual_seed(seed)
                        model = build(name, cfg, d, train.in_chans).to(device)
                        params[key] = sum(p.numel() for p in model.parameters())
                        log({f"{key}.params": params[key]}, step=0)
                        record = {"checkpoints": {}}
                        bar.set_postfix_str(prefix)

                        def callback(step, images, labels, model=model, record=record, prefix=prefix):
                            if step in checkpoints:
                                m = measure(model, probe, cfg.probes, seed)
                                record["checkpoints"][step] = m
                                log(metrics_of(prefix, m), step=step)

                        record["train_loss"] = fit(model, train, steps=cfg.steps, batch_size=cfg.batch_size,
                                                   lr=cfg.lr, seed=seed, device=device, weight_decay=0.05,
                                                   callback=callback, metric_prefix=prefix, bar=bar)
                        record["test_error"] = error_rate(model, test, device)
                        log({f"{prefix}.test_error": record["test_error"]}, step=cfg.steps)
                        per_seed[key].append(record)
        table = {key: summarise(key, recs, checkpoints, params[key]) for key, recs in per_seed.items()}
        results = {"study": "shortcut", "config": cfg.__dict__, "device": str(device), "results": table}
        results["summary"] = summary(cfg, table)
        finish("shortcut", results, plot(cfg, table), started)
        results["run_id"] = mlrun.info.run_id
    return results


def _combine(ms: list[dict], which: int) -> dict:
    """Elementwise mean (which=0) or std (which=1) across seeds of `measure` results."""
    def agg(rows):
        return [mean_std(col)[which] for col in zip(*rows)]

    out = {k: agg([m[k] for m in ms]) for k in ("gamma", "jac")}
    out["steps"] = [{"entry": s["entry"], "channels": s["channels"],
                     **{k: agg([m["steps"][i][k] for m in ms]) for k in ("gamma", "jac")}}
                    for i, s in enumerate(ms[0].get("steps", []))]
    return out


def summarise(key: str, recs: list[dict], checkpoints: list[int], params: int) -> dict:
    """Mean/std across seeds of every measure at every checkpoint (logged), plus the per-seed records."""
    out = {"params": params, "per_seed": recs, "mean": {}, "std": {},
           "test_error": mean_std([r["test_error"] for r in recs])}
    for step in checkpoints:
        ms = [r["checkpoints"][step] for r in recs]
        flat = [metrics_of(key, m) for m in ms]
        stats = {k: mean_std([f[k] for f in flat]) for k in flat[0]}
        log({**{f"{k}.mean": m for k, (m, _) in stats.items()}, **{f"{k}.std": s for k, (_, s) in stats.items()}},
            step=step)
        out["mean"][str(step)], out["std"][str(step)] = _combine(ms, 0), _combine(ms, 1)
    return out


def summary(cfg: Config, table: dict) -> list[str]:
    first, last = str(min(cfg.checkpoints)), str(max(cfg.checkpoints))
    lines = [f"gamma_L (last block) and jac_L, step {first} -> step {last} (mean over seeds {list(cfg.seeds)}):"]
    for key, r in table.items():
        a, b = r["mean"][first], r["mean"][last]
        line = (f"  {key:10s} params {r['params']}: gamma_L {a['gamma'][-1]:.3f} -> {b['gamma'][-1]:.3f}, "
                f"jac_L {a['jac'][-1]:.3f} -> {b['jac'][-1]:.3f}, test error {r['test_error'][0]:.3f}")
        if b["steps"]:
            line += "; per step gamma_L " + " ".join(f"{s['gamma'][-1]:.3f}" for s in b["steps"])
        lines.append(line)
    return lines


def plot(cfg: Config, table: dict):
    """gamma_l and jac_l against l at init and at the last checkpoint, gamma_L against training step, and the
    per-step gamma of the deepest Steps model at the last checkpoint."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8))
    ax = fig.subplots(2, 3)
    first, last = str(min(cfg.checkpoints)), str(max(cfg.checkpoints))
    colors = {d: f"C{i}" for i, d in enumerate(cfg.depths)}
    for key, r in table.items():
        name, d = key.split(".d")
        style = dict(color=colors[int(d)], ls="-" if name == "deit" else "--", label=key)
        ax[0, 0].plot(r["mean"][first]["gamma"], **style)
        ax[0, 1].plot(r["mean"][last]["gamma"], **style)
        ax[1, 0].plot(range(1, len(r["mean"][first]["jac"]) + 1), r["mean"][first]["jac"], **style)
        ax[1, 1].plot(range(1, len(r["mean"][last]["jac"]) + 1), r["mean"][last]["jac"], **style)
        steps = sorted(int(s) for s in r["mean"])
        ax[0, 2].plot(steps, [r["mean"][str(s)]["gamma"][-1] for s in steps], marker="o", **style)
    deepest = [k for k in table if k.startswith("steps.")]
    if deepest:
        key = max(deepest, key=lambda k: int(k.split(".d")[1]))
        for i, s in enumerate(table[key]["mean"][last]["steps"]):
            ls = range(s["entry"], s["entry"] + len(s["gamma"]))
            ax[1, 2].plot(ls, s["gamma"], marker=".", label=f"gamma, step {i} ch {s['channels']}")
            ax[1, 2].plot(list(ls)[1:], s["jac"], ls=":", color=f"C{i}", label=f"jac, step {i}")
        ax[1, 2].set_title(f"{key}: per step, fresh channels, step {last}")
    for a, title in zip(ax.flat, (f"gamma_l at step {first}", f"gamma_l at step {last}", "gamma_L (last block)",
                                  f"jac_l at step {first}", f"jac_l at step {last}")):
        a.set_title(title)
    for a in ax.flat:
        a.set_yscale("log")
        a.set_xlabel("optimizer step" if a is ax[0, 2] else "l (blocks done)")
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    return fig
