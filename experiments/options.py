"""Every job's options, declared once: a dataclass per job whose fields carry the default, the help text and,
for enumerations, the allowed values. `click_options` turns a dataclass into the click options of its command,
so the CLI, Python callers and the studies share one declaration (and `--help` lists every enumeration).

No torch here: the CLI reads these before it decides whether the heavy imports are needed. click is imported
only to build options, so the configs load where click is absent (experiments/gpu_check.py on a bare GPU machine).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from probes.choices import ABLATIONS, ATTRIBUTION_PATHS, METHODS, POOLS, PROBES

if TYPE_CHECKING:
    import click

__all__ = ["opt", "click_options", "options_of", "from_cli", "key_values", "TrainConfig", "DemoConfig", "ProbeConfig",
           "AttributeConfig", "FreezeConfig", "RunsConfig", "DATASETS", "DATA_MODES", "RECIPES",
           "PROBE_PATHS", "PROBE_LEVELS", "RUN_KINDS",
           "RUN_STATUSES", "FORBIDDEN_MODEL_KWARGS", "MODEL_NAMES"]

def _model_names() -> tuple[str, ...]:
    """models.MODELS without importing the models package (torch and timm: seconds): the same names.json."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.find_spec("models")  # finds the package without running its __init__
    pairs = json.loads((Path(spec.submodule_search_locations[0]) / "names.json").read_text())
    return tuple(pairs) + tuple(pairs.values())


# Model names (models.MODELS, read from the same file): a click.Choice, so a typo is refused at once.
MODEL_NAMES: tuple[str, ...] = _model_names()
# Dataset names (experiments.data.DATASETS is this tuple; data.py imports it from here).
DATASETS: tuple[str, ...] = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "hierarchy", "imagenet")
# How a dataset is held: auto streams image folders, imagenet and saved Hugging Face image folders and keeps
# 28-32 px datasets in memory (faster there); memory / stream force one.
DATA_MODES: tuple[str, ...] = ("auto", "memory", "stream")
RECIPES: tuple[str, ...] = ("plain", "deit")
PROBE_PATHS: tuple[str, ...] = ("slow", "fast", "full", "matched", "all")
PROBE_LEVELS: tuple[str, ...] = ("coarse", "fine", "both", "detail", "all")
# create_model kwargs that would make timm load weights from elsewhere (a file, the hub): refused as
# --model-option and in a frozen model's card.
FORBIDDEN_MODEL_KWARGS: tuple[str, ...] = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                                           "checkpoint_path", "cache_dir", "pretrained_strict")
RUN_KINDS: tuple[str, ...] = ("train", "freeze", "probe", "attribute", "study", "figures", "bench")
RUN_STATUSES: tuple[str, ...] = ("RUNNING", "FINISHED", "FAILED", "KILLED", "SCHEDULED")


def opt(default: Any = None, help: str = "", *, choices: Sequence[str] | None = None, flag: str | None = None,
        metavar: str | None = None, multiple: bool = False, cli: bool = True, factory: Callable | None = None
        ) -> Any:
    """A dataclass field with its CLI declaration in `metadata` (see `click_options`).

    `flag` overrides the option name (default ``--field-name``); `multiple` repeats it (a tuple, or a dict of
    KEY=VALUE items for dict fields); `cli=False` keeps a field out of the CLI.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag, "metavar": metavar,
            "multiple": multiple, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def key_values(items: Sequence[str], what: str) -> dict:
    """("n=8000", "img_size=32") -> {"n": 8000, "img_size": 32}: ints and floats parsed, the rest kept as text."""
    from models.errors import UserError

    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"{what} {item!r}: expected KEY=VALUE")
        for parse in (int, float):
            try:
                out[key] = parse(text)
                break
            except ValueError:
                continue
        else:
            out[key] = text
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _option(f: dataclasses.Field, unset: bool) -> "click.Option":
    import click

    meta, default = f.metadata, _default(f)
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    help_text = meta.get("help", "")
    kw: dict[str, Any] = {"help": help_text, "show_default": not unset}
    if unset:  # the studies: None means "not given", so QUICK settings can apply; the default goes in the help
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        kw.update(default=None, show_default=False, help=f"{help_text} [default: {shown}]")
    else:
        kw["default"] = default
    if isinstance(default, bool):
        return click.Option([f"{flag}/--no-{flag[2:]}", f.name], **kw)
    if meta.get("choices"):
        kw["type"] = click.Choice(meta["choices"])
    elif isinstance(default, tuple) and not meta.get("multiple"):
        kw.update(type=str, metavar=meta.get("metavar") or "A,B,...")  # parsed by the caller (studies)
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        kw["type"] = type(default)
    elif f.type in ("int | None", "Optional[int]"):
        kw["type"] = int
    if meta.get("multiple"):
        kw["multiple"] = True
        if isinstance(default, dict):
            kw["default"] = () if not unset else None
            kw["show_default"] = False
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    return click.Option([flag, f.name], **kw)


def click_options(cls: type, *, unset: bool = False, skip: Sequence[str] = ()) -> Callable:
    """A decorator adding one click option per CLI field of dataclass `cls` (in field order).

    bool fields become ``--x/--no-x``, fields with choices a `click.Choice`, dict fields with `multiple` a
    repeated ``KEY=VALUE`` option (convert with `from_cli`). With `unset`, every default is None (see `_option`).
    """
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in skip]

    def decorate(fn: Callable) -> Callable:
        for f in reversed(fields):
            fn.__click_params__ = getattr(fn, "__click_params__", [])
            fn.__click_params__.append(_option(f, unset))
        return fn
    return decorate


def options_of(cls: type, *, unset: bool = False) -> "list[click.Option]":
    """The click options of `cls` as a list (for commands built without a decorator)."""
    return [_option(f, unset) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def from_cli(cls: type, values: dict) -> Any:
    """`cls(**values)` from click's values: repeated KEY=VALUE options become dicts, repeated options tuples."""
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        if isinstance(_default(f), dict) and isinstance(v, (tuple, list)):
            v = key_values(v, f.metadata.get("flag") or "--" + f.name.replace("_", "-"))
        elif isinstance(v, list):
            v = tuple(v)
        kw[f.name] = v
    return cls(**kw)


# ----------------------------------------------------------------------------------------------- train


@dataclass
class TrainConfig:
    """Everything that defines a training run; logged as the MLflow params and stored in the checkpoint."""

    model: str = opt("steps_deit_micro", "Model name (see `probe models`).", choices=MODEL_NAMES)
    dataset: str = opt("fashion_mnist", "Dataset.", choices=DATASETS)
    data_dir: str | None = opt(None, "Dataset folder (default: the dataset's own default).")
    epochs: int = opt(5, "Epochs.")
    batch_size: int = opt(128, "Per process (torchrun: per GPU).")
    lr: float = opt(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on norms, biases, embeddings, tokens).")
    warmup_epochs: float = opt(1.0, "Linear warmup, in epochs.")
    label_smoothing: float = opt(0.1, "Label smoothing of the training loss.")
    clip_grad: float = opt(1.0, "Max gradient norm; 0: off.")
    drop_path: float = opt(0.0, "Stochastic depth rate.")
    limit: int | None = opt(None, "Train images (class-stratified subset); default all.")
    test_limit: int | None = opt(None, "Test images (class-stratified subset); default all.")
    seed: int = opt(0, "Fixes init, data order, augmentation, subsets.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    compile: bool = opt(False, "torch.compile the model.")
    augment: bool = opt(True, "Random translation / flip (streamed data: random resized crop / flip).")
    recipe: str = opt("plain", "plain: the loop as always; deit: DeiT's recipe from timm (RandAugment and random "
                      "erasing on streamed images, Mixup/CutMix, repeated augmentation on streamed data, model EMA).",
                      choices=RECIPES)
    data_mode: str = opt("auto", "auto: stream image folders and imagenet, keep 28-32 px data in memory; stream; "
                         "memory.", choices=DATA_MODES)
    workers: int = opt(4, "DataLoader worker processes decoding streamed images (per process).")
    grad_checkpointing: bool = opt(False, "Recompute activations in the backward pass (less memory, ~30% slower).")
    ema_decay: float = opt(0.99996, "Model EMA decay (recipe deit).")
    checkpoint_dir: str = opt("checkpoints", "Checkpoints go to <dir>/<model>-<dataset>-seed<seed>/last.pt.")
    resume: bool = opt(False, "Continue from the checkpoint, in the same MLflow run.")
    fresh: bool = opt(False, "Start over where another run left a resumable checkpoint (its file is kept beside "
                      "as last-<run id>.pt).")
    register: bool = opt(True, "Register the frozen model.")
    max_steps: int | None = opt(None, "Stop (checkpointed) after this many optimizer steps.")
    log_every: int = opt(20, "Optimizer steps per logged train loss / lr / images/s.")
    data_options: dict = opt(help="Dataset option (repeat), e.g. n=8000 or img_size=32 for hierarchy; imagenet: "
                             "img_size (224), coarse=depthN (N 1..12, default depth5) or entity13 (a BREEDS "
                             "approximation).",
                             flag="--data-option", metavar="KEY=VALUE", multiple=True, factory=dict)
    model_kwargs: dict = opt(help="Extra create_model kwarg (repeat), e.g. patch_size=4.",
                             flag="--model-option", metavar="KEY=VALUE", multiple=True, factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DemoConfig:
    """What `probe demo` takes: the README's main job (experiments.train.run_demo)."""

    limit: int = opt(4000, "Fashion-MNIST train images.")
    test_limit: int = opt(1000, "Fashion-MNIST test images.")
    epochs: int = opt(3, "Epochs.")
    seed: int = opt(0, "Fixes init, data order and subsets.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    checkpoint_dir: str = opt("checkpoints", "Checkpoints go to <dir>/<model>-<dataset>-seed<seed>/last.pt.")
    tracking_uri: str | None = opt(None, "Tracking store (default: $MLFLOW_TRACKING_URI, else mlruns/).",
                                   metavar="URI")


# ----------------------------------------------------------------------------------------------- probe run


@dataclass
class ProbeConfig:
    """What `probe run` takes (experiments.probe_run)."""

    model: str | None = opt(None, "Model name; its newest frozen model is used unless --run is given.",
                            choices=MODEL_NAMES)
    run: str | None = opt(None, "Frozen model: run id, models:/ URI or name.", metavar="REF")
    path: str = opt("all", "Steps: slow, fast, full, all. Baselines: full, matched (slow/fast-width channel "
                    "splits), all.", choices=PROBE_PATHS)
    level: str = opt("both", "coarse, fine, both, detail (fine within coarse), all.", choices=PROBE_LEVELS)
    dataset: str | None = opt(None, "Default: the frozen model's training dataset.", choices=DATASETS)
    data_dir: str | None = opt(None, "Dataset folder (default: the one the model was trained from, if it exists "
                               "here, else the dataset's default).")
    pool: str = opt("mean", "cls (DeiT), mean, tokens.", choices=POOLS)
    layers: str = opt("none", "none, all, or block indices (0,3,7): depth curves.")
    seed: int = opt(0, "Fixes the subsets and the probes' splits.")
    limit: int | None = opt(None, "Train images (class-stratified subset); default all.")
    test_limit: int | None = opt(None, "Test images (class-stratified subset); default all.")
    probe: str = opt("auto", "Probe backend (auto: torch, solved to convergence; sklearn: a cross-check capped "
                             "at 100 iterations).", choices=PROBES)
    random_splits: int = opt(3, "Baselines: random matched splits.")
    mdl: bool = opt(True, "Online MDL (the slowest measure).")
    curves: bool = opt(True, "Small-probe curves.")
    max_memory: str | None = opt(None, "Memory budget for features (8G, 512M, bytes): over it, features go to "
                                 "sharded memory-mapped caches and the probes stream them (level detail "
                                 "stays in memory). Default: no limit, all in memory.", metavar="SIZE")
    tracking_uri: str | None = opt(None, "Tracking store (default: $MLFLOW_TRACKING_URI, else mlruns/).",
                                   metavar="URI")
    n_boot: int = opt(1000, cli=False)
    batch_size: int = opt(256, cli=False)


# ----------------------------------------------------------------------------------------------- attribute


@dataclass
class AttributeConfig:
    """What `probe attribute` takes (experiments.attribute)."""

    model: str | None = opt(None, "Model name; its newest frozen model is used unless --run is given.",
                            choices=MODEL_NAMES)
    run: str | None = opt(None, "Frozen model: run id, models:/ URI or name.", metavar="REF")
    path: str = opt("both", "Paths for the maps and causal tests.", choices=ATTRIBUTION_PATHS)
    method: str = opt("ig", "Input attribution for the path maps.", choices=METHODS)
    dataset: str | None = opt(None, "Default: the frozen model's training dataset.", choices=DATASETS)
    data_dir: str | None = opt(None, "Dataset folder (default: the one the model was trained from, if it exists "
                               "here, else the dataset's default).")
    limit: int = opt(256, "Test images attributed and ablated.")
    probe_limit: int = opt(2000, "Train images for the path probes.")
    seed: int = opt(0, "Fixes subsets, probes, random controls and donors.")
    n_steps: int = opt(32, "Integrated-gradients steps.", flag="--steps")
    modes: tuple[str, ...] = opt(ABLATIONS, "Ablation modes (repeat); the first gives selectivity.<path>.",
                                 choices=ABLATIONS, flag="--ablation", multiple=True)
    pool: str = opt("mean", "Pooling of the probed path features.", choices=POOLS)
    batch_size: int = opt(16, "Images per attribution batch.")
    internal_batch_size: int = opt(256, "captum's internal_batch_size (interpolation points per forward pass).")
    draws: int = opt(3, "Random channel sets per control size.")
    max_delta: float = opt(0.05, "Fail when |convergence delta| exceeds this fraction of the mean "
                           "|F(x) - F(baseline)|.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    grid_images: int = opt(8, cli=False)
    tracking_uri: str | None = opt(None, "Tracking store (default: $MLFLOW_TRACKING_URI, else mlruns/).",
                                   metavar="URI")


# ----------------------------------------------------------------------------------------------- freeze / runs


@dataclass
class FreezeConfig:
    """What `probe freeze` takes (experiments.train.freeze)."""

    run: str = opt(None, "The train run whose checkpoint is frozen (run id; see `probe runs --kind train`).",
                   metavar="RUN_ID")
    model: str | None = opt(None, "With --pretrained: the baseline whose published timm weights are frozen "
                            "(deit_t/s/b, swin_t/s/b, resnet18/34/50; any model with --weights).",
                            choices=MODEL_NAMES)
    pretrained: bool = opt(False, "Freeze published (or given) weights as a baseline, without training.")
    weights: str | None = opt(None, "With --pretrained: a .safetensors (or .pth, read weights-only) file; default: "
                              "the model's weights in the local Hugging Face cache.", metavar="FILE")
    dataset: str = opt("imagenet", "With --pretrained: the data the weights were trained on (the card's dataset).",
                       choices=DATASETS)
    data_dir: str | None = opt(None, "With --pretrained: where that data lives here (recorded on the card).")
    model_kwargs: dict = opt(help="With --pretrained: create_model kwarg (repeat) that the weights need, e.g. "
                             "num_classes=10.", flag="--model-option", metavar="KEY=VALUE", multiple=True,
                             factory=dict)
    checkpoint: str | None = opt(None, "Checkpoint file (default: the run's checkpoint artifact, else its "
                                 "last.pt or the last-<run id>.pt kept beside it).", metavar="PATH")
    tracking_uri: str | None = opt(None, "Tracking store (default: $MLFLOW_TRACKING_URI, else mlruns/).",
                                   metavar="URI")


@dataclass
class RunsConfig:
    """What `probe runs` takes (experiments.runs.list_runs)."""

    kind: str | None = opt(None, "Only runs of this kind.", choices=RUN_KINDS)
    model: str | None = opt(None, "Only runs of this model.", choices=MODEL_NAMES)
    dataset: str | None = opt(None, "Only runs on this dataset.", choices=DATASETS)
    status: str | None = opt(None, "Only runs with this status.", choices=RUN_STATUSES)
    stale: bool = opt(False, "Only RUNNING runs whose heartbeat stopped (their process is gone or unreachable).")
    limit: int = opt(50, "At most this many runs, newest first.")
    tracking_uri: str | None = opt(None, "Tracking store (default: $MLFLOW_TRACKING_URI, else mlruns/).",
                                   metavar="URI")
