"""gradients: the vanishing-gradient experiment (Nielsen, "Neural Networks and Deep Learning", ch. 5), then the
same question for deep plain, residual, highway and Steps networks.

Part 1, sigmoid MLPs [784, 30 x k, 10], k = 1..4, as in Nielsen's fig/generate_gradient.py: his `network2`
defaults, i.e. sigmoid on every layer including the output, CROSS-ENTROPY cost sum_j -y_j ln a_j - (1-y_j)
ln(1-a_j) (network2's default; `--cost quadratic` gives chapter 1's 0.5 ||a - y||^2), weights N(0, 1/n_in),
biases N(0, 1), inputs = pixels / 255, one-hot targets. The measured "speed of learning" of hidden layer l is
||dC/db^l||, C the mean cost over the 1000 training images (= his average of the per-image gradients).
Training is his: full-batch gradient descent on those 1000 images, eta = 0.1, L2 lambda = 5.0 (weights decay
by 1 - eta lambda / n), 500 epochs; the gradient is recorded at the start of each epoch. Data: Fashion-MNIST,
not MNIST, so the numbers differ from his; the data subset is fixed (seed 0), seeds vary the initialisation.
His MNIST values at init are kept in the JSON as `nielsen_mnist_reference`.

Part 2, deep networks of `deep_depth` blocks (`experiments.studies.degradation`: plain = no skip, residual =
x + f(x) pre-LN, highway = gated skip, Steps = StepsStack over the residual blocks; equal parameter counts),
cross-entropy, AdamW. Per block k (execution order, 0-based like the `blocks.{k}` sites): ||dL/dtheta_k|| (all
parameters of the block) and ||dL/dx_k|| (the block's input tensor, batch mean loss). At init averaged over
`init_batches` batches, then on the training batch every `measure_every` steps.

Metrics (s = seed, k = hidden layers, l = hidden layer 1..k as Nielsen counts, D = blocks, b = block 0..D-1):
    seed{s}.mlp{k}.grad_norm.layer{l}         ||dC/db^l||; step = epoch (every `log_every` epochs and the last)
    seed{s}.mlp{k}.cost / .train_error        cost (without the L2 term) and error on the 1000 images; step = epoch
    mlp{k}.grad_norm.layer{l}.mean / .std     across seeds; step = epoch
    mlp{k}.first_last_ratio.mean / .std       ||dC/db^1|| / ||dC/db^k|| across seeds; step = epoch
    seed{s}.{family}.d{D}.grad_param.block{b} ||dL/dtheta_b||; step = training step (0 = init)
    seed{s}.{family}.d{D}.grad_input.block{b} ||dL/dx_b||; step = training step
    seed{s}.{family}.d{D}.train_loss          mean loss over 25 steps; step = training step
    {family}.d{D}.grad_param.block{b}.mean / .std, {family}.d{D}.grad_input.block{b}.mean / .std
    {family}.d{D}.first_last.param.mean / .std, {family}.d{D}.first_last.input.mean / .std
                                              block 0 over block D-1, across seeds; step = training step
Artifacts: gradients.json (every curve per seed, means, config), gradients.png.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from experiments.data import load_dataset
from models.errors import UserError
from experiments.studies import finish, fit, log, mean_std, study_run
from probes.runtime import resolve_device
from experiments.studies.degradation import FAMILIES, DeepMLP, match_width

# Nielsen ch. 5, MNIST, his one initialisation: ||delta^l|| of the hidden layers at init.
NIELSEN_MNIST = {2: [0.07, 0.31], 3: [0.012, 0.060, 0.283], 4: [0.003, 0.017, 0.070, 0.285]}
COSTS = ("cross_entropy", "quadratic")


@dataclass
class Config:
    hidden: tuple[int, ...] = field(default=(1, 2, 3, 4), metadata={"help": "Sigmoid MLPs with k hidden layers."})
    hidden_width: int = field(default=30, metadata={"help": "Neurons per hidden layer (Nielsen: 30)."})
    examples: int = field(default=1000, metadata={"help": "Training images for the sigmoid MLPs (Nielsen: 1000)."})
    epochs: int = field(default=500, metadata={"help": "Full-batch gradient descent epochs (Nielsen: 500)."})
    eta: float = field(default=0.1, metadata={"help": "Learning rate (Nielsen: 0.1)."})
    lmbda: float = field(default=5.0, metadata={"help": "L2 regularisation (Nielsen: 5.0)."})
    cost: str = field(default="cross_entropy", metadata={"help": "cross_entropy (network2) or quadratic."})
    log_every: int = field(default=10, metadata={"help": "Log the MLP metrics every this many epochs."})
    deep_families: tuple[str, ...] = field(default=FAMILIES, metadata={"help": "Deep families to measure."})
    deep_depth: int = field(default=32, metadata={"help": "Blocks of the deep networks (GPU: 64, 128)."})
    width: int = field(default=64, metadata={"help": "Stream width of the deep networks (Steps: matched params)."})
    n_steps: int = field(default=4, metadata={"help": "Steps of the Steps network."})
    deep_steps: int = field(default=100, metadata={"help": "AdamW steps for the deep networks."})
    measure_every: int = field(default=25, metadata={"help": "Measure the deep gradients every this many steps."})
    init_batches: int = field(default=4, metadata={"help": "Batches averaged for the deep gradients at init."})
    batch_size: int = field(default=128, metadata={"help": "Batch size of the deep networks."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate of the deep networks."})
    train_limit: int = field(default=10000, metadata={"help": "Training examples for the deep networks."})
    dataset: str = field(default="fashion_mnist", metadata={"help": "fashion_mnist or hierarchy (1x28x28)."})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "Seeds (initialisation, data order)."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)."})


QUICK = dict(hidden=(1, 2), examples=64, epochs=3, log_every=1, deep_depth=4, width=16, n_steps=2, deep_steps=4,
             measure_every=2, init_batches=1, batch_size=32, train_limit=256, seeds=(0,))


# --------------------------------------------------------------------------------------- sigmoid MLPs


class SigmoidMLP(nn.Module):
    """Nielsen's network2: sigmoid after every layer, weights N(0, 1/n_in), biases N(0, 1).

    `forward` returns the output layer's weighted input z^L; the cost applies the output sigmoid.
    """

    def __init__(self, sizes: list[int], generator: torch.Generator | None = None):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.normal_(0, 1 / math.sqrt(layer.in_features), generator=generator)
                layer.bias.normal_(0, 1, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.sigmoid(layer(x))
        return self.layers[-1](x)


def nielsen_cost(z: torch.Tensor, target: torch.Tensor, kind: str = "cross_entropy") -> torch.Tensor:
    """Mean over examples of network2's cost of the output a = sigmoid(z) against one-hot `target`."""
    if kind == "cross_entropy":
        return F.binary_cross_entropy_with_logits(z, target, reduction="sum") / len(z)
    if kind == "quadratic":
        return 0.5 * (torch.sigmoid(z) - target).pow(2).sum() / len(z)
    raise UserError(f"--cost {kind!r}; allowed: {', '.join(COSTS)}")


def bias_grad_norms(net: SigmoidMLP, x: torch.Tensor, target: torch.Tensor, kind: str = "cross_entropy"
                    ) -> tuple[list[float], float, torch.Tensor]:
    """(||dC/db^l|| for the hidden layers l = 1..k, cost C, output z^L) on (x, target); leaves the gradients
    in place."""
    net.zero_grad(set_to_none=True)
    z = net(x)
    cost = nielsen_cost(z, target, kind)
    cost.backward()
    return [layer.bias.grad.norm().item() for layer in net.layers[:-1]], cost.item(), z.detach()


def nielsen_inputs(ds, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels / 255 flattened, one-hot targets, labels): network2's input encoding."""
    x = (ds.images.float() / 255).flatten(1).to(device)
    labels = ds.fine.to(device)
    return x, F.one_hot(labels, ds.num_fine).float(), labels


def train_sigmoid_mlp(net: SigmoidMLP, x: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                      cfg: Config, prefix: str, bar=None) -> dict:
    """Nielsen's full-batch gradient descent with L2; returns per-epoch hidden-layer norms, cost, error."""
    n = len(x)
    curve = {"grad_norm": [], "cost": [], "train_error": []}
    for epoch in range(cfg.epochs + 1):
        norms, cost, z = bias_grad_norms(net, x, target, cfg.cost)
        error = (z.argmax(-1) != labels).float().mean().item()
        curve["grad_norm"].append(norms)
        curve["cost"].append(cost)
        curve["train_error"].append(error)
        if epoch % cfg.log_every == 0 or epoch == cfg.epochs:
            log({**{f"{prefix}.grad_norm.layer{l + 1}": g for l, g in enumerate(norms)},
                         f"{prefix}.cost": cost, f"{prefix}.train_error": error}, step=epoch)
        if epoch == cfg.epochs:
            break
        with torch.no_grad():  # the gradient just measured is the full-batch gradient: one update per epoch
            for layer in net.layers:
                layer.weight.mul_(1 - cfg.eta * cfg.lmbda / n).sub_(cfg.eta * layer.weight.grad)
                layer.bias.sub_(cfg.eta * layer.bias.grad)
        if bar is not None:
            bar.update(1)
    return curve


# --------------------------------------------------------------------------------------- deep networks


def block_gradients(net: DeepMLP, images: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per block (execution order): ||dL/dtheta_b|| over its parameters and ||dL/dx_b|| of its input tensor,
    L the batch-mean cross-entropy. Clears the gradients afterwards."""
    blocks, inputs = net.block_list(), []

    def grab(module, args):
        args[0].retain_grad()  # the block input is not a leaf: keep its gradient
        inputs.append(args[0])

    handles = [b.register_forward_pre_hook(grab) for b in blocks]
    try:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(images), labels).backward()
    finally:
        for h in handles:
            h.remove()
    param = [math.sqrt(sum(p.grad.pow(2).sum().item() for p in b.parameters())) for b in blocks]
    grad_in = [x.grad.norm().item() for x in inputs]
    net.zero_grad(set_to_none=True)
    return param, grad_in


def measure_deep(cfg: Config, family: str, seed: int, train, device: torch.device, bar=None) -> dict:
    """Gradients of one deep network at init (mean over `init_batches`) and every `measure_every` steps."""
    from experiments.data import batches

    torch.manual_seed(seed)
    width = match_width(family, cfg.deep_depth, cfg.width, cfg.n_steps, train.in_chans * train.img_size ** 2)
    net = DeepMLP(family, cfg.deep_depth, width, train.in_chans * train.img_size ** 2, n_steps=cfg.n_steps)
    net.to(device)
    prefix = f"seed{seed}.{family}.d{cfg.deep_depth}"
    gen = torch.Generator().manual_seed(10_000 + seed)  # init batches: a stream apart from the training order
    init = [block_gradients(net, x, y) for (x, y, _), _ in
            zip(batches(train, cfg.batch_size, shuffle=True, generator=gen, device=device), range(cfg.init_batches))]
    record = {"width": width, "params": sum(p.numel() for p in net.parameters()), "steps": [],
              "grad_param": [], "grad_input": []}

    def keep(step: int, param: list[float], grad_in: list[float]) -> None:
        record["steps"].append(step)
        record["grad_param"].append(param)
        record["grad_input"].append(grad_in)
        log({**{f"{prefix}.grad_param.block{b}": g for b, g in enumerate(param)},
                     **{f"{prefix}.grad_input.block{b}": g for b, g in enumerate(grad_in)}}, step=step)

    keep(0, *([sum(col) / len(col) for col in zip(*part)] for part in zip(*init)))  # mean over init batches

    def callback(step: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        if step > 0 and (step % cfg.measure_every == 0 or step == cfg.deep_steps):
            keep(step, *block_gradients(net, images, labels))

    record["train_loss"] = fit(net, train, steps=cfg.deep_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                               device=device, callback=callback, metric_prefix=prefix, bar=bar)
    return record


# --------------------------------------------------------------------------------------- study


def check(cfg: Config) -> None:
    if cfg.cost not in COSTS:
        raise UserError(f"--cost {cfg.cost!r}; allowed: {', '.join(COSTS)}")
    if any(k < 1 for k in cfg.hidden) or cfg.hidden_width < 1 or cfg.examples < 1 or cfg.epochs < 0:
        raise UserError("--hidden, --hidden-width, --examples: allowed: positive integers; --epochs >= 0")
    bad = [f for f in cfg.deep_families if f not in FAMILIES]
    if bad:
        raise UserError(f"--deep-families: unknown {bad[0]!r}; allowed: {', '.join(FAMILIES)}")
    if min(cfg.deep_depth, cfg.deep_steps, cfg.measure_every, cfg.init_batches, cfg.log_every) < 1:
        raise UserError("--deep-depth, --deep-steps, --measure-every, --init-batches, --log-every: "
                         "allowed: positive integers")


def run(cfg: Config) -> dict:
    """Both parts, every seed; logs as it goes; returns the results (see the module docstring)."""
    check(cfg)
    device = resolve_device(cfg.device)
    started = time.time()
    small = load_dataset(cfg.dataset, "train", limit=cfg.examples, seed=0)
    train = load_dataset(cfg.dataset, "train", limit=cfg.train_limit)
    x, target, labels = nielsen_inputs(small, device)
    mlps = {k: [] for k in cfg.hidden}
    deep = {f: [] for f in cfg.deep_families}
    with study_run("gradients", cfg) as mlrun:
        total = len(cfg.seeds) * (len(cfg.hidden) * cfg.epochs + len(cfg.deep_families) * cfg.deep_steps)
        with tqdm(total=total, desc="gradients", unit="step", disable=None) as bar:
            for seed in cfg.seeds:
                for k in cfg.hidden:
                    gen = torch.Generator().manual_seed(seed)
                    net = SigmoidMLP([x.shape[1]] + [cfg.hidden_width] * k + [small.num_fine], gen).to(device)
                    bar.set_postfix_str(f"seed{seed}.mlp{k}")
                    mlps[k].append(train_sigmoid_mlp(net, x, target, labels, cfg, f"seed{seed}.mlp{k}", bar))
                for f in cfg.deep_families:
                    bar.set_postfix_str(f"seed{seed}.{f}.d{cfg.deep_depth}")
                    deep[f].append(measure_deep(cfg, f, seed, train, device, bar))
        results = {"study": "gradients", "config": cfg.__dict__, "device": str(device),
                   "nielsen_mnist_reference": NIELSEN_MNIST,
                   "mlp": summarise_mlps(cfg, mlps, x.shape[1], small.num_fine),
                   "deep": summarise_deep(cfg, deep)}
        results["summary"] = summary(cfg, results)
        finish("gradients", results, plot(cfg, results), started)
        results["run_id"] = mlrun.info.run_id
    return results


def summarise_mlps(cfg: Config, mlps: dict, n_in: int, n_out: int) -> dict:
    """Per k: per-seed curves, and mean/std across seeds of every layer's norm per epoch (logged when due)."""
    out = {}
    for k, curves in mlps.items():
        epochs = range(cfg.epochs + 1)
        stats = [[mean_std([c["grad_norm"][e][l] for c in curves]) for l in range(k)] for e in epochs]
        ratios = [mean_std([c["grad_norm"][e][0] / c["grad_norm"][e][-1] for c in curves]) for e in epochs]
        for e in epochs:
            if e % cfg.log_every == 0 or e == cfg.epochs:
                log({**{f"mlp{k}.grad_norm.layer{l + 1}.mean": m for l, (m, _) in enumerate(stats[e])},
                             **{f"mlp{k}.grad_norm.layer{l + 1}.std": s for l, (_, s) in enumerate(stats[e])},
                             f"mlp{k}.first_last_ratio.mean": ratios[e][0],
                             f"mlp{k}.first_last_ratio.std": ratios[e][1]}, step=e)
        out[str(k)] = {"sizes": [n_in] + [cfg.hidden_width] * k + [n_out],
                       "grad_norm_mean": [[m for m, _ in row] for row in stats],
                       "grad_norm_std": [[s for _, s in row] for row in stats],
                       "first_last_ratio_mean": [m for m, _ in ratios], "per_seed": curves}
    return out


def summarise_deep(cfg: Config, deep: dict) -> dict:
    """Per family: per-seed records and mean/std across seeds per measured step and block (logged)."""
    out = {}
    for f, recs in deep.items():
        pre = f"{f}.d{cfg.deep_depth}"
        entry = {"width": recs[0]["width"], "params": recs[0]["params"], "steps": recs[0]["steps"], "per_seed": recs}
        for kind in ("grad_param", "grad_input"):
            stats = [[mean_std([r[kind][t][b] for r in recs]) for b in range(cfg.deep_depth)]
                     for t in range(len(recs[0]["steps"]))]
            ratios = [mean_std([r[kind][t][0] / r[kind][t][-1] for r in recs]) for t in range(len(stats))]
            entry[f"{kind}_mean"] = [[m for m, _ in row] for row in stats]
            entry[f"{kind}_std"] = [[s for _, s in row] for row in stats]
            entry[f"{kind}_first_last_mean"] = [m for m, _ in ratios]
            short = kind.split("_")[1]
            for t, step in enumerate(entry["steps"]):
                log({**{f"{pre}.{kind}.block{b}.mean": m for b, (m, _) in enumerate(stats[t])},
                             **{f"{pre}.{kind}.block{b}.std": s for b, (_, s) in enumerate(stats[t])},
                             f"{pre}.first_last.{short}.mean": ratios[t][0],
                             f"{pre}.first_last.{short}.std": ratios[t][1]}, step=step)
        out[f] = entry
    return out


def summary(cfg: Config, results: dict) -> list[str]:
    lines = [f"sigmoid MLPs, ||dC/db^l|| of hidden layers 1..k at init (mean over seeds {list(cfg.seeds)}, "
             f"{cfg.cost} cost) and after {cfg.epochs} epochs:"]
    for k, r in results["mlp"].items():
        init = ", ".join(f"{v:.4f}" for v in r["grad_norm_mean"][0])
        end = ", ".join(f"{v:.4f}" for v in r["grad_norm_mean"][-1])
        lines.append(f"  k={k}: init [{init}]  end [{end}]  (Nielsen MNIST: {NIELSEN_MNIST.get(int(k), '-')})")
    lines.append(f"deep networks, {cfg.deep_depth} blocks: first/last block gradient ratio (params, input) "
                 f"at init -> after {cfg.deep_steps} steps:")
    for f, r in results["deep"].items():
        lines.append(f"  {f:9s} params {r['params']}: param {r['grad_param_first_last_mean'][0]:.3g} -> "
                     f"{r['grad_param_first_last_mean'][-1]:.3g}, input {r['grad_input_first_last_mean'][0]:.3g}"
                     f" -> {r['grad_input_first_last_mean'][-1]:.3g}")
    return lines


def plot(cfg: Config, results: dict):
    """Top: sigmoid MLPs at init per layer, during training (largest k), first/last ratio. Bottom: deep
    networks' per-block parameter gradient at init and after training, input gradient at init."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8))
    ax = fig.subplots(2, 3)
    for k, r in results["mlp"].items():
        line, = ax[0, 0].plot(range(1, int(k) + 1), r["grad_norm_mean"][0], marker="o", label=f"k={k}")
        if int(k) in NIELSEN_MNIST:
            ax[0, 0].plot(range(1, int(k) + 1), NIELSEN_MNIST[int(k)], ls=":", marker="x", color=line.get_color())
        ax[0, 2].plot(r["first_last_ratio_mean"], label=f"k={k}")
    ax[0, 0].set(yscale="log", xlabel="hidden layer l", ylabel="||dC/db^l||",
                 title="sigmoid MLPs at init (dotted: Nielsen, MNIST)")
    kmax = str(max(cfg.hidden))
    curves = results["mlp"][kmax]["grad_norm_mean"]
    for l in range(int(kmax)):
        ax[0, 1].plot([row[l] for row in curves], label=f"layer {l + 1}")
    ax[0, 1].set(yscale="log", xlabel="epoch", ylabel="||dC/db^l||", title=f"during training, k={kmax}")
    ax[0, 2].set(yscale="log", xlabel="epoch", ylabel="layer 1 / layer k", title="first/last ratio")
    for f, r in results["deep"].items():
        blocks = range(cfg.deep_depth)
        ax[1, 0].plot(blocks, r["grad_param_mean"][0], label=f)
        ax[1, 1].plot(blocks, r["grad_param_mean"][-1], label=f)
        ax[1, 2].plot(blocks, r["grad_input_mean"][0], label=f)
    d = cfg.deep_depth
    ax[1, 0].set(yscale="log", xlabel="block", ylabel="||dL/dtheta_b||", title=f"{d} blocks, at init")
    ax[1, 1].set(yscale="log", xlabel="block", ylabel="||dL/dtheta_b||", title=f"after {cfg.deep_steps} steps")
    ax[1, 2].set(yscale="log", xlabel="block", ylabel="||dL/dx_b||", title="block input gradient at init")
    for a in ax.flat:
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return fig
