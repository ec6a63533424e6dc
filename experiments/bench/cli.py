"""The bench's command line (`python -m experiments.bench`, `make bench`): its options declared once as
`BenchConfig` (experiments.options), turned into a Setup and a Plan, then `run.bench`. Defaults that depend on
the device or --quick are written once, below, and quoted by the help.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from experiments.bench.harness import Setup, cpu_cores, restart_clock, slug
from experiments.bench.run import DEFAULT_SECTIONS, SECTIONS, Plan, bench
from experiments.errors import UserError, guarded
from experiments.options import click_options, from_cli, opt
from models.registry import BASELINE_OF, MODELS, is_steps
from probes.runtime import resolve_device

RESULTS = Path(__file__).resolve().parents[1] / "results"
STEPS = tuple(BASELINE_OF)
MICRO = tuple(s for s in STEPS if s.endswith("_micro"))
# Full-size pairs, ordered so that a budget cut drops the least informative last (one per family first).
FULL = ("steps_deit_s", "steps_swin_t", "steps_resnet50", "steps_deit_b", "steps_deit_t", "steps_swin_s",
        "steps_resnet34", "steps_swin_b", "steps_resnet18")
# Default --cuda-graphs pairs: the small ones, where kernel launches weigh most (and graph memory is small).
GRAPHS_DEFAULT = ("steps_deit_t", "steps_deit_s", "steps_swin_t", "steps_resnet18", "steps_resnet50") + MICRO
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BATCH, QUICK_CPU_BATCH = 128, 32
REPEATS = {"cpu": 7, "cuda": 3}
QUICK_REPEATS = {"cpu": 3, "cuda": 2}
BUDGET_S = {"cpu": 420, "cuda": 270}
PROBE_N, PROBE_D = {"full": 50000, "quick": 10000}, {"full": 768, "quick": 256}
ATTR_IMAGES = {"full": 32, "quick": 8}


@dataclass
class BenchConfig:
    """What `python -m experiments.bench` takes; None is the device's (and --quick's) default, named in the help."""

    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    quick: bool = opt(False, "Small batch, fewer rounds, small probe (a smoke run).")
    out: str | None = opt(None, "Folder for bench-<device>.json/.md. [default: experiments/results]")
    models: str | None = opt(None, "Comma-separated Steps (or baseline) names, or micro | full. [default: micro "
                             f"pairs on CPU, 224 px pairs on CUDA ({len(FULL)}; --quick the first 3)]")
    repeats: int | None = opt(None, "Interleaved rounds for throughput; overhead and paths use about half. "
                              f"[default: {REPEATS['cpu']} CPU, {REPEATS['cuda']} CUDA; --quick "
                              f"{QUICK_REPEATS['cpu']} / {QUICK_REPEATS['cuda']}]")
    budget_s: int | None = opt(None, f"Cap for the whole run, seconds. [default: {BUDGET_S['cpu']} CPU, "
                               f"{BUDGET_S['cuda']} CUDA]")
    batch: int | None = opt(None, f"Batch size. [default: {BATCH}; --quick on CPU {QUICK_CPU_BATCH}]")
    sections: str = opt(",".join(DEFAULT_SECTIONS), f"Comma-separated subset of {', '.join(SECTIONS)}.")
    profile: str = opt("auto", "The profile section (auto: as --sections; on adds it; off drops it).",
                       choices=("auto", "on", "off"))
    compile: bool = opt(False, "Add the torch.compile section.")
    compile_models: str | None = opt(None, "Steps models for --compile. [default: the first pair]")
    compile_mode: str = opt("default", "torch.compile mode (reduce-overhead adds CUDA graphs).",
                            choices=COMPILE_MODES)
    cuda_graphs: bool = opt(False, "Add the CUDA graphs section (CUDA only).")
    fused_window_attn: bool = opt(False, "Swin pairs: both models' window attention through scaled_dot_product_"
                                  "attention (timm's fused path, off by default there as experimental).")
    graphs_models: str | None = opt(None, "Steps models for --cuda-graphs, of those measured. [default: the micro "
                                    f"ones and {', '.join(n for n in GRAPHS_DEFAULT if 'micro' not in n)}]")
    probe_n: int | None = opt(None, f"Probe training rows. [default: {PROBE_N['full']}; --quick {PROBE_N['quick']}]")
    probe_d: int | None = opt(None, f"Probe feature dim. [default: {PROBE_D['full']}; --quick {PROBE_D['quick']}]")
    probe_classes: int = opt(10, "Probe classes.")
    attr_images: int | None = opt(None, f"Images attributed. [default: {ATTR_IMAGES['full']}; --quick "
                                  f"{ATTR_IMAGES['quick']}]")
    ig_steps: int = opt(32, "Integrated-gradients steps.")
    attr_model: str | None = opt(None, f"Steps model for attribution. [default: the first micro one measured, "
                                 f"else {MICRO[0]}]", choices=STEPS)
    threads: int | None = opt(None, "torch CPU threads. [default: torch's, one per core]")
    tag: str | None = opt(None, "Output name suffix: bench-<device>-<tag>.json/.md.")
    track: bool = opt(True, "Log an MLflow run of kind bench.")


def model_list(spec: str | None, flag: str) -> list[str] | None:
    """Comma-separated Steps or baseline names (a baseline stands for its pair), or micro | full, as the Steps
    names of the pairs; None when not given."""
    if not spec:
        return None
    if spec in ("micro", "full"):
        return list(MICRO if spec == "micro" else FULL)
    inverse = {b: s for s, b in BASELINE_OF.items()}
    names: list[str] = []
    for n in (s.strip() for s in spec.split(",") if s.strip()):
        if n not in MODELS:
            raise UserError(f"{flag}: unknown model {n!r}; allowed: micro, full, {', '.join(MODELS)}")
        s = n if is_steps(n) else inverse[n]
        if s not in names:
            names.append(s)
    return names


def setup_of(cfg: BenchConfig, t0: float) -> Setup:
    """The run's Setup: the options given, the device's defaults for the rest; the budget counts from `t0`."""
    device = resolve_device(cfg.device)
    for flag, v in (("--repeats", cfg.repeats), ("--budget-s", cfg.budget_s), ("--batch", cfg.batch),
                    ("--threads", cfg.threads)):
        if v is not None and v < 1:
            raise UserError(f"{flag} {v}: must be at least 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    kind = "cuda" if device.type == "cuda" else "cpu"
    if kind == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
        card = torch.cuda.get_device_name(device)
        name = slug(card)
    else:
        card = f"CPU, {cpu_cores()} cores, {torch.get_num_threads()} torch threads"
        name = f"cpu-{cpu_cores()}cores"
    budget_s = float(cfg.budget_s or BUDGET_S[kind])
    return Setup(device=device, slug=name, card=card, dtype="bf16 autocast" if kind == "cuda" else "fp32",
                 batch=cfg.batch or (QUICK_CPU_BATCH if cfg.quick and kind == "cpu" else BATCH),
                 repeats=cfg.repeats or (QUICK_REPEATS if cfg.quick else REPEATS)[kind],
                 target_s=0.15 if kind == "cuda" else 0.3, warmup=2 if kind == "cuda" else 1, budget_s=budget_s,
                 deadline=t0 + budget_s, quick=cfg.quick, fused_window_attn=cfg.fused_window_attn)


def plan_of(cfg: BenchConfig, setup: Setup) -> Plan:
    """What the run measures: sections, pairs and section options, defaults resolved for `setup`'s device."""
    sections = [s.strip() for s in cfg.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise UserError(f"--sections: unknown section(s) {', '.join(bad)}; allowed: {', '.join(SECTIONS)}")
    if cfg.profile == "off" and "profile" in sections:
        sections.remove("profile")
    if cfg.profile == "on" and "profile" not in sections:
        sections.append("profile")
    if cfg.compile and "compile" not in sections:
        sections.append("compile")
    if cfg.cuda_graphs and "graphs" not in sections:
        sections.append("graphs")
    names = model_list(cfg.models, "--models") or list(MICRO if not setup.cuda else FULL[:3] if cfg.quick else FULL)
    size = "quick" if cfg.quick else "full"
    return Plan(models=names, sections=sections,
                compile_models=model_list(cfg.compile_models, "--compile-models") or names[:1],
                graphs_models=(model_list(cfg.graphs_models, "--graphs-models")
                               or [n for n in names if n in GRAPHS_DEFAULT]),
                compile_mode=cfg.compile_mode, probe_n=cfg.probe_n or PROBE_N[size],
                probe_d=cfg.probe_d or PROBE_D[size], probe_classes=cfg.probe_classes,
                attr_model=cfg.attr_model or next((n for n in names if n.endswith("_micro")), MICRO[0]),
                attr_images=cfg.attr_images or ATTR_IMAGES[size], ig_steps=cfg.ig_steps,
                out=Path(cfg.out) if cfg.out else RESULTS, tag=cfg.tag, track=cfg.track)


def run_config(cfg: BenchConfig) -> dict:
    """A bench run from Python: returns the report (also written to files and MLflow)."""
    t0 = restart_clock()
    setup = setup_of(cfg, t0)
    return bench(setup, plan_of(cfg, setup))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click_options(BenchConfig)
def command(**values) -> dict:
    """Time every Steps model against its baseline at matched MACs, interleaved, on this device; write
    <out>/bench-<device>.json and .md and an MLflow run of kind bench."""
    return run_config(from_cli(BenchConfig, values))


def main(argv: list[str] | None = None) -> None:
    """`command` under the project's error policy (experiments.errors): a user's mistake, click's usage errors
    included, is one line and exit status 2; a bug keeps its traceback."""
    def invoke() -> None:
        try:
            command.main(argv, prog_name="python -m experiments.bench", standalone_mode=False)
        except click.ClickException as exc:  # bad option, value not among the choices
            raise UserError(exc.format_message()) from None
        except click.exceptions.Abort:  # Ctrl-C
            sys.exit("Aborted!")
    guarded(invoke)
