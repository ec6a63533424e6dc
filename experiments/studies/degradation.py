"""degradation: final training error against depth for plain, residual, highway and Steps MLPs.

The degradation claim (He et al. 2016) is about TRAINING error: past some depth a plain network trains worse
than a shallower one, which overfitting cannot explain. We train every family at every depth with the same
budget and report what happens, test error beside it.

Networks (flattened 28x28 images; stem Linear(784, W), blocks, final LayerNorm, head Linear(W, 10)):
    plain     x <- f(x)                              f(x) = W2 GELU(W1 LN(x)), hidden width W
    residual  x <- x + f(x)                          (pre-LN, the Transformer MLP block with ratio 1)
    highway   x <- T(x) f(x) + (1 - T(x)) x          T(x) = sigmoid(W_T LN(x) + b_T), b_T = -2 (Srivastava et
              al. 2015: a negative carry bias); f's hidden width is W/2 so the block has the residual's 2W^2
    steps     `models.steps.StepsStack` over the residual blocks: n steps of D/n blocks, widths
              C_i = W' 2^{-(n-i)/2}; W' (multiple of 8) is picked so the whole network has the residual
              network's parameter count at the same depth (narrow early steps are cheap, so W' > W)
Plain keeps the LayerNorm: as in He et al.'s plain nets (which kept BatchNorm), the skip is the only
difference from residual. Equal budget: same depth D, optimizer steps, batch, lr schedule, data order;
parameters within a few percent (for an MLP, MACs per example = weight parameters, so FLOPs match too).
Training: AdamW, linear warmup 5% then cosine decay, cross-entropy, no augmentation.

Metrics (s = seed, D = blocks):
    seed{s}.{family}.d{D}.train_loss      mean loss over 25 steps; step = optimizer step
    seed{s}.{family}.d{D}.train_error     error on the whole training subset after training; step = steps
    seed{s}.{family}.d{D}.test_error      error on the test subset after training; step = steps
    {family}.train_error.mean / .std      across seeds; step = D (so MLflow plots error against depth)
    {family}.test_error.mean / .std       across seeds; step = D
    {family}.params                       parameter count; step = D
Artifacts: degradation.json (config, per-seed and mean/std errors, params, widths), degradation.png.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from experiments.data import load_dataset
from models.errors import UserError
from experiments.studies import error_rate, finish, fit, log, mean_std, split_depth, study_run
from probes.runtime import resolve_device
from models.steps import StepsStack, step_widths

FAMILIES = ("plain", "residual", "highway", "steps")
WIDTH_MULTIPLE = 8  # Steps widths are rounded to this


@dataclass
class Config:
    depths: tuple[int, ...] = field(default=(4, 8, 16, 32), metadata={"help": "Blocks per network (GPU: add 64,128)."})
    families: tuple[str, ...] = field(default=FAMILIES, metadata={"help": "Subset of plain,residual,highway,steps."})
    width: int = field(default=64, metadata={"help": "Stream width W of plain/residual/highway."})
    n_steps: int = field(default=4, metadata={"help": "Steps of the Steps network (fewer when depth is smaller)."})
    steps: int = field(default=300, metadata={"help": "Optimizer steps, the same for every network."})
    batch_size: int = field(default=128, metadata={"help": "Batch size."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)."})
    dataset: str = field(default="fashion_mnist", metadata={"help": "fashion_mnist or hierarchy (1x28x28)."})
    train_limit: int = field(default=10000, metadata={"help": "Training examples (stratified subset)."})
    test_limit: int = field(default=2000, metadata={"help": "Test examples."})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "Seeds (init and data order; GPU: 0,1,2)."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)."})


QUICK = dict(depths=(2, 4), width=16, n_steps=2, steps=6, batch_size=32, train_limit=256, test_limit=128, seeds=(0,))


# ------------------------------------------------------------------------------------------------- networks


class Block(nn.Module):
    """Pre-LN MLP block body f(x) = W2 GELU(W1 LN(x)); `kind` says how f meets the stream."""

    def __init__(self, width: int, kind: str = "residual"):
        super().__init__()
        self.kind = kind
        hidden = width // 2 if kind == "highway" else width  # highway's gate pays for itself (see docstring)
        self.norm = nn.LayerNorm(width)
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)
        if kind == "highway":
            self.gate = nn.Linear(width, width)
            nn.init.constant_(self.gate.bias, -2.0)  # start close to carrying x through (T ~ 0.12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        f = self.fc2(self.act(self.fc1(h)))
        if self.kind == "plain":
            return f
        if self.kind == "residual":
            return x + f
        t = torch.sigmoid(self.gate(h))
        return t * f + (1 - t) * x


class DeepMLP(nn.Module):
    """stem -> `depth` blocks of `family` -> LayerNorm -> head, on flattened images."""

    def __init__(self, family: str, depth: int, width: int, in_features: int = 784, num_classes: int = 10,
                 n_steps: int = 4):
        super().__init__()
        if family not in FAMILIES:
            raise UserError(f"unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
        self.family, self.depth, self.width = family, depth, width
        self.stem = nn.Linear(in_features, width)
        if family == "steps":
            n = min(n_steps, depth)
            self.blocks = StepsStack(step_widths(width, n, WIDTH_MULTIPLE), split_depth(depth, n),
                                     lambda w, index, position: Block(w, "residual"), channel_dim=-1)
        else:
            self.blocks = nn.Sequential(*[Block(width, family) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def block_list(self) -> list[nn.Module]:
        """Every block in execution order."""
        return self.blocks.block_modules() if isinstance(self.blocks, StepsStack) else list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x.flatten(1)))))


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def match_width(family: str, depth: int, width: int, n_steps: int = 4, in_features: int = 784) -> int:
    """The stream width that gives a `family` network of `depth` blocks the parameter count of the residual
    network at `width`: `width` itself except for Steps, which gets the closest multiple of 8 whose step
    widths are valid (its narrow early steps are cheap, so it ends up wider)."""
    if family != "steps":
        return width
    target = count(DeepMLP("residual", depth, width, in_features))
    best = None
    for w in range(max(WIDTH_MULTIPLE, width - width % WIDTH_MULTIPLE), 4 * width + 1, WIDTH_MULTIPLE):
        try:
            gap = abs(count(DeepMLP("steps", depth, w, in_features, n_steps=n_steps)) - target)
        except ValueError:  # widths collapse when rounding (too narrow for n steps)
            continue
        if best is not None and gap > best[0]:
            break  # the count grows with w: past the best, it only gets worse
        best = (gap, w)
    if best is None:
        raise UserError(f"width {width} too narrow for {n_steps} Steps of multiples of {WIDTH_MULTIPLE}; "
                         f"allowed: --width >= {WIDTH_MULTIPLE * 2} or fewer --n-steps")
    return best[1]


def make_net(family: str, depth: int, width: int, n_steps: int = 4, in_features: int = 784) -> DeepMLP:
    """A `family` network of `depth` blocks with the parameter count of the residual one at `width`."""
    return DeepMLP(family, depth, match_width(family, depth, width, n_steps, in_features), in_features,
                   n_steps=n_steps)


def describe(net: DeepMLP) -> dict:
    """Width(s), depth and params of a network, for the results JSON."""
    info = {"width": net.width, "depth": net.depth, "params": count(net)}
    if isinstance(net.blocks, StepsStack):
        info.update(step_widths=net.blocks.widths, step_depths=net.blocks.depths)
    return info


# ------------------------------------------------------------------------------------------------- study


def check(cfg: Config) -> None:
    bad = [f for f in cfg.families if f not in FAMILIES]
    if bad:
        raise UserError(f"--families: unknown {bad[0]!r}; allowed: {', '.join(FAMILIES)}")
    if cfg.width < 2 * WIDTH_MULTIPLE or cfg.width % WIDTH_MULTIPLE:
        raise UserError(f"--width {cfg.width}; allowed: a multiple of {WIDTH_MULTIPLE}, >= {2 * WIDTH_MULTIPLE}")
    if cfg.n_steps < 1:
        raise UserError(f"--n-steps {cfg.n_steps}; allowed: >= 1")


def run(cfg: Config) -> dict:
    """Train every family at every depth and seed; log errors; return the results (see module docstring)."""
    check(cfg)
    device = resolve_device(cfg.device)
    train = load_dataset(cfg.dataset, "train", limit=cfg.train_limit)
    test = load_dataset(cfg.dataset, "test", limit=cfg.test_limit)
    in_features = train.in_chans * train.img_size ** 2
    started = time.time()
    nets = {(f, d): describe(make_net(f, d, cfg.width, cfg.n_steps, in_features))
            for f in cfg.families for d in cfg.depths}
    errors = {(f, d): {"train": [], "test": []} for f in cfg.families for d in cfg.depths}
    with study_run("degradation", cfg) as mlrun:
        for (f, d), info in nets.items():
            log({f"{f}.params": info["params"]}, step=d)
        total = len(cfg.seeds) * len(nets) * cfg.steps
        with tqdm(total=total, desc="degradation", unit="step", disable=None) as bar:
            for seed in cfg.seeds:
                for d in cfg.depths:
                    for f in cfg.families:
                        torch.manual_seed(seed)
                        net = DeepMLP(f, d, nets[f, d]["width"], in_features, n_steps=cfg.n_steps)
                        prefix = f"seed{seed}.{f}.d{d}"
                        bar.set_postfix_str(prefix)
                        fit(net, train, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                            device=device, weight_decay=cfg.weight_decay, metric_prefix=prefix, bar=bar)
                        tr, te = error_rate(net, train, device), error_rate(net, test, device)
                        errors[f, d]["train"].append(tr)
                        errors[f, d]["test"].append(te)
                        log({f"{prefix}.train_error": tr, f"{prefix}.test_error": te}, step=cfg.steps)
        table = {}
        for f in cfg.families:
            table[f] = {}
            for d in cfg.depths:
                (trm, trs), (tem, tes) = mean_std(errors[f, d]["train"]), mean_std(errors[f, d]["test"])
                log({f"{f}.train_error.mean": trm, f"{f}.train_error.std": trs,
                             f"{f}.test_error.mean": tem, f"{f}.test_error.std": tes}, step=d)
                table[f][str(d)] = dict(nets[f, d], train_error=errors[f, d]["train"], test_error=errors[f, d]["test"],
                                        train_error_mean=trm, train_error_std=trs, test_error_mean=tem,
                                        test_error_std=tes)
        results = {"study": "degradation", "config": cfg.__dict__, "device": str(device), "results": table,
                   "summary": summary(cfg, table)}
        finish("degradation", results, plot(cfg, table), started)
        results["run_id"] = mlrun.info.run_id
    return results


def summary(cfg: Config, table: dict) -> list[str]:
    """One line per family: train error (mean +- std over seeds) at each depth, then test error."""
    lines = [f"final training error (test error) after {cfg.steps} steps, mean+-std over seeds {list(cfg.seeds)}:"]
    for f, rows in table.items():
        cells = [f"D={d}: {r['train_error_mean']:.3f}+-{r['train_error_std']:.3f} ({r['test_error_mean']:.3f})"
                 for d, r in rows.items()]
        lines.append(f"  {f:9s} " + "  ".join(cells))
    return lines


def plot(cfg: Config, table: dict):
    """Training and test error against depth, one line per family, error bars = std over seeds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key, title in zip(axes, ("train_error", "test_error"), ("training error", "test error")):
        for f, rows in table.items():
            depths = [int(d) for d in rows]
            ax.errorbar(depths, [r[f"{key}_mean"] for r in rows.values()],
                        yerr=[r[f"{key}_std"] for r in rows.values()], marker="o", capsize=3, label=f)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # plain's failure and the small gaps between the others on one axis
        ax.set_xticks(list(cfg.depths), [str(d) for d in cfg.depths])
        ax.set_xlabel("blocks")
        ax.set_ylabel(title)
        ax.set_title(f"{title} after {cfg.steps} steps")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return fig
