"""The bench's command line (`python -m experiments.bench`, `make bench`): options to a Setup and a Plan, then
`run.bench`. Defaults that depend on the device or --quick are written once, below, and quoted by the help."""
from __future__ import annotations

from pathlib import Path

import click
import torch

from experiments.bench.harness import Setup, cpu_cores, restart_clock, slug
from experiments.bench.run import DEFAULT_SECTIONS, SECTIONS, Plan, bench
from experiments.errors import UserError
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
BUDGET_S = {"cpu": 420.0, "cuda": 270.0}
PROBE_N, PROBE_D = {"full": 50000, "quick": 10000}, {"full": 768, "quick": 256}
ATTR_IMAGES = {"full": 32, "quick": 8}


def _model_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    """Comma-separated Steps or baseline names (a baseline stands for its pair), or micro | full, as the Steps
    names of the pairs; None when not given."""
    if not value:
        return None
    if value in ("micro", "full"):
        return list(MICRO if value == "micro" else FULL)
    inverse = {b: s for s, b in BASELINE_OF.items()}
    names: list[str] = []
    for n in (s.strip() for s in value.split(",") if s.strip()):
        if n not in MODELS:
            raise UserError(f"{param.opts[0]}: unknown model {n!r}; allowed: micro, full, {', '.join(MODELS)}")
        s = n if is_steps(n) else inverse[n]
        if s not in names:
            names.append(s)
    return names


def _section_list(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad:
        raise UserError(f"--sections: unknown section(s) {', '.join(bad)}; allowed: {', '.join(SECTIONS)}")
    return names


def make_setup(device: torch.device, quick: bool, batch: int | None, repeats: int | None, budget_s: float | None,
               t0: float) -> Setup:
    """The run's Setup: the options given, the device's defaults for the rest; the budget counts from `t0`."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    if kind == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
        card = torch.cuda.get_device_name(device)
        name = slug(card)
    else:
        card = f"CPU, {cpu_cores()} cores, {torch.get_num_threads()} torch threads"
        name = f"cpu-{cpu_cores()}cores"
    budget_s = budget_s or BUDGET_S[kind]
    return Setup(device=device, slug=name, card=card, dtype="bf16 autocast" if kind == "cuda" else "fp32",
                 batch=batch or (QUICK_CPU_BATCH if quick and kind == "cpu" else BATCH),
                 repeats=repeats or (QUICK_REPEATS if quick else REPEATS)[kind],
                 target_s=0.15 if kind == "cuda" else 0.3, warmup=2 if kind == "cuda" else 1, budget_s=budget_s,
                 deadline=t0 + budget_s, quick=quick)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--device", default="auto", show_default=True, callback=lambda ctx, p, v: resolve_device(v),
              help="auto, cpu, cuda, cuda:N.")
@click.option("--quick", is_flag=True, help="Small batch, fewer rounds, small probe (a smoke run).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=RESULTS,
              show_default="experiments/results", help="Folder for bench-<device>.json/.md.")
@click.option("--models", callback=_model_list,
              help="Comma-separated Steps (or baseline) names, or micro | full. [default: micro pairs on CPU, 224 px "
                   f"pairs on CUDA ({len(FULL)}; --quick the first 3)]")
@click.option("--repeats", type=click.IntRange(min=1),
              help=f"Interleaved rounds for throughput; overhead and paths use about half. [default: "
                   f"{REPEATS['cpu']} CPU, {REPEATS['cuda']} CUDA; --quick {QUICK_REPEATS['cpu']} / "
                   f"{QUICK_REPEATS['cuda']}]")
@click.option("--budget-s", type=float,
              help=f"Cap for the whole run, seconds. [default: {BUDGET_S['cpu']:.0f} CPU, {BUDGET_S['cuda']:.0f} CUDA]")
@click.option("--batch", type=click.IntRange(min=1),
              help=f"Batch size. [default: {BATCH}; --quick on CPU {QUICK_CPU_BATCH}]")
@click.option("--sections", default=",".join(DEFAULT_SECTIONS), show_default=True, callback=_section_list,
              help=f"Comma-separated subset of {', '.join(SECTIONS)}.")
@click.option("--profile", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="The profile section (auto: as --sections; on adds it; off drops it).")
@click.option("--compile", "compile_", is_flag=True, help="Add the torch.compile section.")
@click.option("--compile-models", callback=_model_list, help="Steps models for --compile. [default: the first pair]")
@click.option("--compile-mode", type=click.Choice(COMPILE_MODES), default="default", show_default=True,
              help="torch.compile mode (reduce-overhead adds CUDA graphs).")
@click.option("--cuda-graphs", is_flag=True, help="Add the CUDA graphs section (CUDA only).")
@click.option("--graphs-models", callback=_model_list,
              help="Steps models for --cuda-graphs, of those measured. [default: the micro ones and "
                   f"{', '.join(n for n in GRAPHS_DEFAULT if 'micro' not in n)}]")
@click.option("--probe-n", type=click.IntRange(min=1),
              help=f"Probe training rows. [default: {PROBE_N['full']}; --quick {PROBE_N['quick']}]")
@click.option("--probe-d", type=click.IntRange(min=1),
              help=f"Probe feature dim. [default: {PROBE_D['full']}; --quick {PROBE_D['quick']}]")
@click.option("--probe-classes", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--attr-images", type=click.IntRange(min=1),
              help=f"Images attributed. [default: {ATTR_IMAGES['full']}; --quick {ATTR_IMAGES['quick']}]")
@click.option("--ig-steps", type=click.IntRange(min=1), default=32, show_default=True,
              help="Integrated-gradients steps.")
@click.option("--attr-model", type=click.Choice(STEPS),
              help="Steps model for attribution. [default: the first micro one measured, else "
                   f"{MICRO[0]}]")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads. [default: torch's, one per core]")
@click.option("--tag", help="Output name suffix: bench-<device>-<tag>.json/.md.")
@click.option("--no-track", is_flag=True, help="Do not log an MLflow run.")
def main(device: torch.device, quick: bool, out: Path, models: list[str] | None, repeats: int | None,
         budget_s: float | None, batch: int | None, sections: list[str], profile: str, compile_: bool,
         compile_models: list[str] | None, compile_mode: str, cuda_graphs: bool, graphs_models: list[str] | None,
         probe_n: int | None, probe_d: int | None, probe_classes: int, attr_images: int | None, ig_steps: int,
         attr_model: str | None, threads: int | None, tag: str | None, no_track: bool) -> dict:
    """Time every Steps model against its baseline at matched MACs, interleaved, on this device; write
    <out>/bench-<device>.json and .md and an MLflow run of kind bench. Returns the report."""
    t0 = restart_clock()
    if threads:
        torch.set_num_threads(threads)
    setup = make_setup(device, quick, batch, repeats, budget_s, t0)
    if profile == "off" and "profile" in sections:
        sections.remove("profile")
    if profile == "on" and "profile" not in sections:
        sections.append("profile")
    if compile_ and "compile" not in sections:
        sections.append("compile")
    if cuda_graphs and "graphs" not in sections:
        sections.append("graphs")
    if not models:
        models = list(MICRO if not setup.cuda else FULL[:3] if quick else FULL)
    size = "quick" if quick else "full"
    plan = Plan(models=models, sections=sections, compile_models=compile_models or models[:1],
                graphs_models=graphs_models or [n for n in models if n in GRAPHS_DEFAULT],
                compile_mode=compile_mode, probe_n=probe_n or PROBE_N[size], probe_d=probe_d or PROBE_D[size],
                probe_classes=probe_classes,
                attr_model=attr_model or next((n for n in models if n.endswith("_micro")), MICRO[0]),
                attr_images=attr_images or ATTR_IMAGES[size], ig_steps=ig_steps, out=out, tag=tag,
                track=not no_track)
    return bench(setup, plan)
