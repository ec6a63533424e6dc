"""Depth studies: small, seeded experiments on why deep nets are hard to train and what StepsNet changes.

    gradients     vanishing gradients (Nielsen ch. 5) in sigmoid MLPs, then per-block gradients of deep plain,
                  residual, highway and Steps MLPs
    degradation   final training (and test) error against depth for plain / residual / highway / Steps MLPs
    shortcut      the paper's shortcut ratio gamma_l = sigma(z0)/sigma(z_l) and ||d z^_l / d z^_0|| for DeiT and
                  Steps-DeiT, at init and through a short training
    depth         accuracy against depth for DeiT and Steps-DeiT deepened at fixed MACs (narrower when deeper)

Each study is one module with a `Config` dataclass (CPU defaults), `QUICK` (overrides for tests) and
`run(cfg) -> dict`. `probe study NAME [--quick] [--field value ...]` runs one as ONE MLflow run (kind "study",
tag ``stepslab.study=NAME``), logs metrics as it goes and the artifacts ``NAME.json`` (results) and
``NAME.png`` (plot). The CLI options of a study are generated from its `Config` fields (``--seeds 0,1,2``).

Metric names (each module's docstring lists its own):
    seed{s}.<prefix>.<metric>          one seed, logged live; step = training step (or epoch for Nielsen's MLPs)
    <prefix>.<metric>.mean / .std      across seeds (std with ddof=1; 0 for one seed), logged at the end
where <prefix> names the network: ``mlp{k}`` (k sigmoid hidden layers), ``{family}.d{D}`` (family at D blocks),
or a family alone when the metric's step is the depth.

This module imports torch lazily so `probe --help` stays fast.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import time
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import click

from experiments.options import options_of

if TYPE_CHECKING:
    import torch

__all__ = ["STUDIES", "load_study", "make_config", "run_study", "study_group", "study_run", "finish",
           "log", "mean_std", "fit", "error_rate", "split_depth"]

# name -> one-line description (also the `probe study --help` listing, without importing torch)
STUDIES: dict[str, str] = {
    "gradients": "Vanishing gradients: sigmoid MLPs (Nielsen ch. 5), then deep plain/residual/highway/Steps MLPs.",
    "degradation": "Training error against depth: plain vs residual vs highway vs Steps MLPs, equal budget.",
    "shortcut": "Shortcut ratio sigma(z0)/sigma(z_l) and input Jacobian norm, DeiT vs Steps-DeiT.",
    "depth": "Accuracy against depth at fixed MACs: DeiT (narrower) vs Steps-DeiT.",
    "dol": "Division of labour, end to end: seeds, planted positive controls, power/MDE, an HTML+PDF report.",
}


# ------------------------------------------------------------------------------------------- registry, CLI


def load_study(name: str) -> ModuleType:
    """The module of study `name`; UserError (one line) for an unknown name."""
    from models.errors import UserError  # here, not at the top: `probe --help` must not load timm

    if name not in STUDIES:
        raise UserError(f"unknown study {name!r}; allowed: {', '.join(STUDIES)}")
    return importlib.import_module(f"experiments.studies.{name}")


def _parse(value: Any, default: Any, field: str) -> Any:
    """A CLI / keyword value converted to the type of the field's default (tuples from "a,b,c")."""
    from models.errors import UserError

    if isinstance(default, tuple):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        kind = type(default[0]) if default else str
        try:
            out = tuple(kind(v.strip()) if isinstance(v, str) else kind(v) for v in items)
        except ValueError:
            raise UserError(f"--{field.replace('_', '-')} {value!r}: expected comma-separated "
                             f"{kind.__name__} values, e.g. {','.join(map(str, default))}") from None
        if not out:
            raise UserError(f"--{field.replace('_', '-')} is empty; allowed: one or more values")
        return out
    if isinstance(default, bool) or default is None:
        return value
    try:
        return type(default)(value)
    except ValueError:
        raise UserError(f"--{field.replace('_', '-')} {value!r}: expected {type(default).__name__}") from None


def make_config(module: ModuleType, quick: bool = False, **overrides: Any) -> Any:
    """`module.Config` with `module.QUICK` applied when `quick`, then `overrides` (None means "not given").

    Checks what every study shares: seeds are non-negative, depths and step counts positive; each study's
    `run` checks its own fields.
    """
    from models.errors import UserError

    fields = {f.name: f for f in dataclasses.fields(module.Config)}
    values = dict(module.QUICK) if quick else {}
    for key, value in overrides.items():
        if key not in fields:
            raise UserError(f"study option {key!r} unknown; allowed: {', '.join(fields)}")
        if value is not None:
            values[key] = value
    base = module.Config()
    values = {k: _parse(v, getattr(base, k), k) for k, v in values.items()}
    cfg = dataclasses.replace(base, **values)
    if any(s < 0 for s in cfg.seeds):
        raise UserError(f"--seeds {cfg.seeds}: allowed: non-negative integers")
    for key in ("depths", "steps", "batch_size", "train_limit", "test_limit", "width"):
        value = getattr(cfg, key, None)
        if value is not None and any(v < 1 for v in (value if isinstance(value, tuple) else (value,))):
            raise UserError(f"--{key.replace('_', '-')} {value}: allowed: positive integers")
    return cfg


def run_study(name: str, quick: bool = False, **overrides: Any) -> dict:
    """Run study `name` (one MLflow run) and return its results dict (``run_id``, ``summary`` lines, ...)."""
    module = load_study(name)
    return module.run(make_config(module, quick, **overrides))


def _command(name: str, module: ModuleType) -> click.Command:
    def callback(quick: bool, **overrides: Any) -> None:
        result = module.run(make_config(module, quick, **overrides))
        for line in result.get("summary", []):
            click.echo(line)
        click.echo(f"run {result['run_id']}  (kind=study, stepslab.study={name}; artifacts {name}.json, {name}.png)")

    params = [click.Option(["--quick"], is_flag=True, help="Tiny settings (seconds), for tests and smoke runs.")]
    params += options_of(module.Config, unset=True)
    doc = (module.__doc__ or STUDIES[name]).strip().split("\n\n")[0]
    return click.Command(name, callback=callback, params=params, help=doc, short_help=STUDIES[name])


class StudyGroup(click.Group):
    """`probe study NAME`: commands built on demand from each study's Config (torch is imported only then)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(STUDIES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command:
        return _command(name, load_study(name))  # unknown name: ValueError, one line from the CLI

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Studies"):
            formatter.write_dl(list(STUDIES.items()))


def study_group() -> click.Group:
    """The `study` click group for experiments.cli."""
    return StudyGroup("study", help="Run a depth study (one MLflow run): " + ", ".join(STUDIES)
                      + ". `probe study NAME --help` lists its options and CPU defaults.")


# ------------------------------------------------------------------------------------------- tracking


class _LiveMetrics:
    """Metrics buffered and written with one MLflow log_batch every `every_s` seconds and when the run ends.

    One SQLite write per call costs ~50 ms on a busy 2-core machine, more than a training step of a micro
    model; batching keeps "logged as they go" (a few seconds behind) without slowing the study down.
    """

    def __init__(self, run_id: str, every_s: float = 5.0):
        self.run_id, self.every_s, self.buffer, self.last = run_id, every_s, [], time.time()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), stamp, int(step)) for k, v in metrics.items()
                        if v is not None and not math.isnan(float(v))]
        if len(self.buffer) >= 1000 or time.time() - self.last > self.every_s:
            self.flush()

    def flush(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient()
        while self.buffer:  # MLflow takes at most 1000 metrics per batch
            chunk, self.buffer = self.buffer[:1000], self.buffer[1000:]
            client.log_batch(self.run_id, metrics=chunk)
        self.last = time.time()


_live: list[_LiveMetrics] = []  # the active study run's buffer (a list, so nested use is visible)


def log(metrics: dict[str, float], step: int = 0) -> None:
    """Log `metrics` at `step` to the active study run (buffered, see `_LiveMetrics`); None/NaN skipped."""
    if _live:
        _live[-1].log(metrics, step)
    else:
        from experiments.tracking import log_metrics

        log_metrics(metrics, step=step)


@contextlib.contextmanager
def study_run(name: str, cfg: Any) -> Iterator[Any]:
    """One MLflow run of kind "study" tagged ``stepslab.study=name``, with the config as params.

    Inside it, `log` buffers metrics for this run, and `cfg.threads` (> 0) sets torch's CPU threads (put back
    afterwards): these micro models are bound by per-op overhead, and two threads on a busy 2-core machine
    spend more time synchronising than computing.
    """
    import torch

    from experiments.tracking import tracked_run

    params = {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    threads = torch.get_num_threads()
    from experiments.tracking import model_tags, run_name

    model, dataset = getattr(cfg, "model", None), getattr(cfg, "dataset", None)
    tags = {"stepslab.study": name, **(model_tags(model) if model else {}),
            **({"stepslab.dataset": dataset} if dataset else {})}
    with tracked_run("study", params, tags=tags, run_name=run_name("study", name, model, dataset)) as run:
        _live.append(_LiveMetrics(run.info.run_id))
        if getattr(cfg, "threads", 0) > 0:
            torch.set_num_threads(cfg.threads)
        done = False
        try:
            yield run
            done = True
        finally:
            live = _live.pop()
            torch.set_num_threads(threads)
            try:
                live.flush()
            except Exception:
                if done:  # a failing study keeps its own exception
                    raise


def finish(name: str, results: dict, fig: Any, started: float) -> None:
    """Log `results` as ``NAME.json`` and `fig` as ``NAME.png`` to the active run, with the runtime."""
    from experiments.tracking import log_dict_artifact, log_figure

    results["runtime_s"] = round(time.time() - started, 1)
    log({"runtime_s": results["runtime_s"]})
    log_dict_artifact(results, f"{name}.json")
    log_figure(fig, f"{name}.png")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ------------------------------------------------------------------------------------------- training


def split_depth(depth: int, num_steps: int) -> list[int]:
    """`depth` blocks over `num_steps` steps as evenly as possible; the extra blocks go to the last (widest)
    steps, as in the paper's Steps-DeiT-S/B (5, 5, 7, 7)."""
    base, extra = divmod(depth, num_steps)
    return [base + (i >= num_steps - extra) for i in range(num_steps)]


def fit(model: "torch.nn.Module", ds: Any, *, steps: int, batch_size: int, lr: float, seed: int,
        device: "torch.device", weight_decay: float = 0.0, warmup: float = 0.05,
        callback: Callable[[int, "torch.Tensor", "torch.Tensor"], None] | None = None,
        metric_prefix: str | None = None, log_every: int = 25, bar: Any = None) -> list[float]:
    """Train `model` for exactly `steps` optimizer steps with the training loop's own pieces
    (experiments.train: `make_optimizer`, `warmup_cosine` with `warmup` of the steps and decay to 0,
    `train_step`): only the budget (steps, not epochs) and the data stream differ from `probe train`.

    Batches are drawn from shuffled epochs of `ds` (a LabeledImages, fine labels) with a generator seeded by
    `seed`, so every family sees the same data order. `callback(step, images, labels)` is called before
    update `step` (step = updates done so far) and once more after the last one (step == steps), for
    measurements. The mean loss of each `log_every` steps is logged as ``{metric_prefix}.train_loss``.
    Returns the per-step losses.
    """
    import torch

    from experiments.train import TrainState, make_optimizer, train_step, warmup_cosine
    from probes.runtime import batches

    model.to(device).train()
    state = TrainState(model=model, net=model, optimizer=make_optimizer(model, lr, weight_decay))
    warm = max(1, int(warmup * steps))
    gen = torch.Generator().manual_seed(seed)

    def stream():
        while True:
            yield from batches(ds, batch_size, shuffle=True, generator=gen, device=device, drop_last=True)

    data, losses, window = stream(), [], []
    for step in range(steps + 1):
        images, labels, _ = next(data)
        if callback is not None:
            callback(step, images, labels)
            model.train()
        if step == steps:
            break
        rate = warmup_cosine(step, peak=lr, total=steps, warmup=warm)
        losses.append(train_step(state, images, labels, rate, device).item())
        window.append(losses[-1])
        if metric_prefix and (len(window) == log_every or step == steps - 1):
            log({f"{metric_prefix}.train_loss": sum(window) / len(window)}, step=step + 1)
            window = []
        if bar is not None:
            bar.update(1)
    return losses


def error_rate(model: "torch.nn.Module", ds: Any, device: "torch.device", batch_size: int = 1000) -> float:
    """Fraction of `ds` (fine labels) that `model` misclassifies: the training loop's `evaluate`."""
    from experiments.train import evaluate

    model.eval()
    return 1.0 - evaluate(model, ds, device, batch_size)["fine_acc"]
