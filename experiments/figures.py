"""`probe figures`: every figure of the write-up regenerated from MLflow runs, PNG + PDF, byte-reproducible.

Each figure is one function registered in `FIGURES` (name -> function taking the chosen runs, returning a
matplotlib Figure, or None when those runs lack its data) with its `Source` in `SOURCES`: the kind and tags of
the runs it reads, a regex a metric of a usable run must match, and the command that makes such a run. By
default a figure reads the newest FINISHED run that fits its source (`find_runs`, newest first); runs given
with ``--runs`` are pinned: a figure reads the pinned runs that fit it, in the order given (figures that
draw one panel per run take several), and the newest otherwise. A pinned run that fits no chosen figure, or
an unknown run id, is a one-line error. A figure with no fitting run is skipped and the command that would
make one is printed.

    figure               source runs (kind, tags)                   metrics read
    shortcut             study, stepslab.study=shortcut            {deit|steps}.d{D}.gamma.z{l}.mean, .jac.z{l}.mean
                                                                  (history: first and last checkpoint)
    degradation          study, stepslab.study=degradation         {family}.train_error.mean / .std,
                                                                  {family}.test_error.mean / .std (step = D)
    gradients            study, stepslab.study=gradients           mlp{k}.grad_norm.layer{l}.mean (first step),
                                                                  {family}.d{D}.grad_param.block{b}.mean (first, last)
    probe_accuracy       probe                                     acc.<path>.<coarse|fine> with .ci_low / .ci_high,
                                                                  dol.acc (+ CIs)
    probe_depth          probe (run with --layers)                 depth.acc.<path>.<level> (step = block)
    attribution_shares   attribute                                 share.<path>.<level>, selectivity.<path>.<mode>
                                                                  (+ .ci_low / .ci_high where logged)
    attribution_maps     attribute                                 artifact maps/grid.png, re-saved as it is
    paper_table          none: models.counting.count_model on       params M, GMACs, blocks, layers vs PAPER
                         every paper_models() name (minutes on CPU)
    throughput           bench                                     ratio.<name>: throughput ratios (latest value)

Bench contract (experiments/bench, metric names in experiments/bench/report.py): one run of kind ``bench``
whose metrics named ``ratio.<name>`` are throughput ratios (e.g. Steps images/s over its baseline's); every
``ratio.*`` metric of the newest finished bench run is drawn as one bar, sorted by name, against the line 1.

Reproducible bytes: figures are built on the Agg canvas under the matplotlib "default" style plus `RC`, saved
at `DPI` with the PNG "Software" and the PDF Creator/Producer/CreationDate entries removed; inputs are sorted
and no timestamp is drawn, so the same runs give the same files. Everything written is logged to ONE MLflow
run of kind ``figures`` (the PNG/PDF files as they are on disk, and ``figures.json``: sources and skips).
"""
from __future__ import annotations

import contextlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import matplotlib
import matplotlib.style

matplotlib.use("Agg")  # no display; the same renderer everywhere

import mlflow  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from tqdm import tqdm  # noqa: E402

from experiments.tracking import (KIND_TAG, TrackingError, configure, find_runs, log_dict_artifact,  # noqa: E402
                                  tracked_run)
from models.errors import UserError  # noqa: E402

__all__ = ["FIGURES", "SOURCES", "Source", "FiguresResult", "make_figures", "DPI", "RC"]

DPI = 150
# pdf.fonttype 3 (matplotlib's default) over 42: subsetting TrueType fonts through fontTools doubled save time.
RC = {"font.family": "DejaVu Sans", "font.size": 8, "axes.titlesize": 9, "axes.grid": True, "grid.alpha": 0.3,
      "legend.fontsize": 7, "figure.dpi": 100, "savefig.dpi": DPI, "pdf.fonttype": 3, "svg.hashsalt": "stepslab"}
PNG_META = {"Software": None}
PDF_META = {"Creator": None, "Producer": None, "CreationDate": None}
# Known names first in this order (families, paths, levels), anything else after, alphabetically.
_ORDER = ("plain", "residual", "highway", "deit", "steps", "slow", "fast", "full", "matched.contiguous.slow",
          "matched.contiguous.fast", "coarse", "fine", "detail", "zero", "mean", "resample")
_STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class Source:
    """Which runs a figure reads: `kind`, `tags`, a regex one of their metric keys must match, the command that
    makes one, and how many runs it draws (None: one panel per run)."""
    kind: str
    tags: tuple[tuple[str, str], ...]
    needs: str
    command: str
    max_runs: int | None = 1

    def fits(self, run: Run) -> bool:
        """Whether `run` has this source's kind and tags and a metric matching `needs`."""
        tags = run.data.tags
        return (tags.get(KIND_TAG) == self.kind and all(tags.get(k) == v for k, v in self.tags)
                and any(re.search(self.needs, k) for k in run.data.metrics))

    def describe(self) -> str:
        return " ".join([f"{self.kind} run"] + [f"{k}={v}" for k, v in self.tags])


FIGURES: dict[str, Callable[[list[Run]], Figure | None]] = {}
SOURCES: dict[str, Source | None] = {}


def _figure(name: str, source: Source | None = None) -> Callable:
    def register(fn: Callable[[list[Run]], Figure | None]) -> Callable[[list[Run]], Figure | None]:
        FIGURES[name], SOURCES[name] = fn, source
        return fn
    return register


# ------------------------------------------------------------------------------------------------ helpers


def _ordered(names) -> list[str]:
    return sorted(set(names), key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


def _history(run: Run, key: str) -> list[tuple[int, float]]:
    """(step, value) of metric `key`, by step; a step logged twice (a resumed run) keeps its last value."""
    points = sorted(MlflowClient().get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
    return sorted({m.step: m.value for m in points}.items())


def _label(run: Run) -> str:
    tags = run.data.tags
    what = ", ".join(t for t in (tags.get("stepslab.model"), tags.get("stepslab.dataset")) if t)
    return f"{tags.get(KIND_TAG)} run {run.info.run_id[:8]}" + (f" ({what})" if what else "")


def _ci(metrics: dict[str, float], keys: list[str]) -> list[tuple[float, ...]] | None:
    """Error bars (2 x n: down to .ci_low, up to .ci_high) for `keys`, 0 where a CI is missing; None if all are."""
    if not any(f"{k}.ci_low" in metrics for k in keys):
        return None
    # max(0, ...): a percentile CI can miss the point estimate, and matplotlib refuses negative error bars.
    return [tuple(max(0.0, metrics[k] - metrics.get(f"{k}.ci_low", metrics[k])) for k in keys),
            tuple(max(0.0, metrics.get(f"{k}.ci_high", metrics[k]) - metrics[k]) for k in keys)]


@contextlib.contextmanager
def _style() -> Iterator[None]:
    # Figures read rcParams when built: fixed defaults, whatever the user's matplotlibrc says.
    with matplotlib.style.context(["default", RC]):
        yield


def _save(fig: Figure, stem: Path) -> list[Path]:
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    fig.savefig(png, format="png", dpi=DPI, metadata=PNG_META)
    fig.savefig(pdf, format="pdf", dpi=DPI, metadata=PDF_META)
    return [png, pdf]


# ------------------------------------------------------------------------------------------------ figures


@_figure("shortcut", Source("study", (("stepslab.study", "shortcut"),), r"^\w+\.d\d+\.gamma\.z\d+\.mean$",
                            "probe study shortcut"))
def shortcut_figure(runs: list[Run]) -> Figure | None:
    """Shortcut ratio gamma_l and input Jacobian norm against block l, DeiT vs Steps-DeiT, at init and at the
    last checkpoint (means over seeds)."""
    run, pat = runs[0], re.compile(r"^(\w+)\.d(\d+)\.(gamma|jac)\.z(\d+)\.mean$")
    curves: dict[tuple[str, str, int], dict[int, list]] = {}
    for key in sorted(run.data.metrics):
        if m := pat.match(key):
            curves.setdefault((m[3], m[1], int(m[2])), {})[int(m[4])] = _history(run, key)
    if not curves:
        return None
    depths = sorted({d for _, _, d in curves})
    models = _ordered(model for _, model, _ in curves)
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False)
    for row, measure in enumerate(("gamma", "jac")):
        for col, at in enumerate((0, -1)):  # first and last checkpoint
            ax, steps = axes[row][col], set()
            for model in models:
                for depth in depths:
                    per_l = curves.get((measure, model, depth))
                    if not per_l:
                        continue
                    ls = sorted(per_l)
                    steps |= {per_l[l][at][0] for l in ls}
                    ax.plot(ls, [per_l[l][at][1] for l in ls], marker=".", color=f"C{models.index(model)}",
                            linestyle=_STYLES[depths.index(depth) % len(_STYLES)], label=f"{model} D={depth}")
            name = "gamma_l = sigma(z_0)/sigma(z_l)" if measure == "gamma" else "||dz^_l/dz^_0|| (normalised)"
            ax.set(yscale="log", xlabel="block l", ylabel=name,
                   title=f"{measure} at step {', '.join(map(str, sorted(steps)))}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
    fig.suptitle(f"shortcut ratio and input Jacobian against depth: {_label(run)}")
    return fig


@_figure("degradation", Source("study", (("stepslab.study", "degradation"),), r"^\w+\.train_error\.mean$",
                               "probe study degradation"))
def degradation_figure(runs: list[Run]) -> Figure | None:
    """Final training (and test) error against depth, one line per family (error bars: std over seeds)."""
    run, pat = runs[0], re.compile(r"^(\w+)\.(train|test)_error\.mean$")
    found = sorted((m[1], m[2]) for k in run.data.metrics if (m := pat.match(k)))
    if not found:
        return None
    families = _ordered(f for f, _ in found)
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)[0]
    depths: set[int] = set()
    for ax, split in zip(axes, ("train", "test")):
        for i, family in enumerate(families):
            if (family, split) not in found:
                continue
            mean = dict(_history(run, f"{family}.{split}_error.mean"))
            std = dict(_history(run, f"{family}.{split}_error.std"))
            ds = sorted(mean)
            depths |= set(ds)
            ax.errorbar(ds, [mean[d] for d in ds], yerr=[std.get(d, 0.0) for d in ds], marker="o", capsize=3,
                        color=f"C{i}", label=family)
        ax.set(xscale="log", xlabel="blocks", ylabel=f"{split} error", title=f"final {split} error against depth")
        ax.legend()
    for ax in axes:
        ax.set_xticks(sorted(depths), [str(d) for d in sorted(depths)])
        ax.minorticks_off()
    fig.suptitle(f"degradation: {_label(run)}")
    return fig


@_figure("gradients", Source("study", (("stepslab.study", "gradients"),),
                             r"(^mlp\d+\.grad_norm\.layer\d+|\.grad_param\.block\d+)\.mean$", "probe study gradients"))
def gradients_figure(runs: list[Run]) -> Figure | None:
    """Per-layer gradient norms: sigmoid MLPs at init (Nielsen ch. 5), deep nets per block at init and at the end."""
    run = runs[0]
    mlp_pat, deep_pat = re.compile(r"^mlp(\d+)\.grad_norm\.layer(\d+)\.mean$"), \
        re.compile(r"^(\w+)\.d(\d+)\.grad_param\.block(\d+)\.mean$")
    mlp: dict[int, dict[int, list]] = {}
    deep: dict[tuple[str, int], dict[int, list]] = {}
    for key in sorted(run.data.metrics):
        if m := mlp_pat.match(key):
            mlp.setdefault(int(m[1]), {})[int(m[2])] = _history(run, key)
        elif m := deep_pat.match(key):
            deep.setdefault((m[1], int(m[2])), {})[int(m[3])] = _history(run, key)
    if not mlp and not deep:
        return None
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3, squeeze=False)[0]
    for k in sorted(mlp):
        ls = sorted(mlp[k])
        axes[0].plot(ls, [mlp[k][l][0][1] for l in ls], marker="o", label=f"{k} hidden layers")
    axes[0].set(yscale="log", xlabel="hidden layer l", ylabel="||dC/db^l||",
                title="sigmoid MLPs at init (Nielsen ch. 5)")
    families = _ordered(f for f, _ in deep)
    for ax, at, when in ((axes[1], 0, "first"), (axes[2], -1, "last")):
        steps = set()
        for (family, depth), per_b in sorted(deep.items(), key=lambda kv: (families.index(kv[0][0]), kv[0][1])):
            bs = sorted(per_b)
            steps |= {per_b[b][at][0] for b in bs}
            ax.plot(bs, [per_b[b][at][1] for b in bs], marker=".", color=f"C{families.index(family)}",
                    label=f"{family} D={depth}")
        ax.set(yscale="log", xlabel="block b", ylabel="||dL/dtheta_b||",
               title=f"deep nets, {when} measurement (step {', '.join(map(str, sorted(steps))) or '-'})")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend()
    fig.suptitle(f"per-layer gradient norms: {_label(run)}")
    return fig


@_figure("probe_accuracy", Source("probe", (), r"^acc\..+\.(coarse|fine)$",
                                  "probe run --model steps_deit_micro  (frozen model first: probe demo)", None))
def probe_accuracy_figure(runs: list[Run]) -> Figure | None:
    """Probe test accuracy per path (slow, fast, full; baselines: matched splits) x level (coarse, fine) with
    95% bootstrap CIs, one panel per probe run; the division of labour score in the title."""
    pat = re.compile(r"^acc\.(.+)\.(coarse|fine)$")
    fig = Figure(figsize=(4.8 * len(runs), 3.8), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs):
        met = run.data.metrics
        found = {(m[1], m[2]) for k in met if (m := pat.match(k)) and "random" not in m[1]}
        paths, levels = _ordered(p for p, _ in found), _ordered(lv for _, lv in found)
        width = 0.8 / max(1, len(paths))
        for i, path in enumerate(paths):
            lvs = [lv for lv in levels if (path, lv) in found]
            keys = [f"acc.{path}.{lv}" for lv in lvs]
            ax.bar([levels.index(lv) + (i - (len(paths) - 1) / 2) * width for lv in lvs], [met[k] for k in keys],
                   width, yerr=_ci(met, keys), capsize=3, label=path)
        ax.set_xticks(range(len(levels)), levels)
        ax.set(ylim=(0, 1), ylabel="probe test accuracy")
        dol = ""
        if "dol.acc" in met:
            lo, hi = met.get("dol.acc.ci_low"), met.get("dol.acc.ci_high")
            dol = f"\ndivision of labour {met['dol.acc']:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None
                                                                     and hi is not None else "")
        ax.set_title(_label(run) + dol)
        ax.legend()
    return fig


@_figure("probe_depth", Source("probe", (), r"^depth\.acc\.",
                               "probe run --model steps_deit_micro --layers all  (frozen model first: probe demo)",
                               None))
def probe_depth_figure(runs: list[Run]) -> Figure | None:
    """Probe accuracy against block, one line per path, one panel per level; one row per probe run."""
    pat = re.compile(r"^depth\.acc\.(.+)\.(coarse|fine|detail)$")
    found = [sorted((m[1], m[2]) for k in run.data.metrics if (m := pat.match(k))) for run in runs]
    if not any(found):
        return None
    cols = max(len({lv for _, lv in f}) for f in found)
    fig = Figure(figsize=(4.5 * cols, 3.4 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), cols, squeeze=False)
    for row, (run, keys) in enumerate(zip(runs, found)):
        levels, paths = _ordered(lv for _, lv in keys), _ordered(p for p, _ in keys)
        for col, ax in enumerate(axes[row]):
            if col >= len(levels):
                ax.set_axis_off()
                continue
            for i, path in enumerate(paths):
                if (path, levels[col]) in keys:
                    pts = _history(run, f"depth.acc.{path}.{levels[col]}")
                    ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=path)
            ax.set(xlabel="block", ylabel="probe test accuracy", title=f"{levels[col]}: {_label(run)}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
    return fig


@_figure("attribution_shares", Source("attribute", (), r"^share\.",
                                      "probe attribute --model steps_deit_micro  (frozen model first: probe demo)",
                                      None))
def attribution_shares_figure(runs: list[Run]) -> Figure | None:
    """Path shares of the attribution at the merge point (slow vs fast, fine vs coarse) and the selectivity of
    ablating each path against its damage-matched control (95% CI where logged); one row per attribute run."""
    fig = Figure(figsize=(10, 3.6 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for row, run in zip(axes, runs):
        met = run.data.metrics
        for ax, prefix, ylabel, title in zip(row, ("share", "selectivity"),
                                             ("share of attribution", "selectivity (fine - coarse drop vs control)"),
                                             ("path shares at the merge point", "ablation selectivity per mode")):
            pat = re.compile(rf"^{prefix}\.(slow|fast)\.(\w+)$")
            found = {(m[1], m[2]) for k in met if (m := pat.match(k))}
            paths, groups = _ordered(p for p, _ in found), _ordered(g for _, g in found)
            for i, path in enumerate(paths):
                gs = [g for g in groups if (path, g) in found]
                keys = [f"{prefix}.{path}.{g}" for g in gs]
                ax.bar([groups.index(g) + (i - 0.5) * 0.4 for g in gs], [met[k] for k in keys], 0.4,
                       yerr=_ci(met, keys), capsize=3, color=f"C{i}", label=path)
            ax.set_xticks(range(len(groups)), groups)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set(ylabel=ylabel, title=f"{title}: {_label(run)}")
            if paths:
                ax.legend()
    return fig


@_figure("attribution_maps", Source("attribute", (), r"^map\.",
                                    "probe attribute --model steps_deit_micro  (frozen model first: probe demo)"))
def attribution_maps_figure(runs: list[Run]) -> Figure | None:
    """The attribute run's input-attribution map grid (artifact maps/grid.png), pixel for pixel."""
    import matplotlib.image

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path="maps/grid.png",
                                                        dst_path=tmp)
        except (MlflowException, OSError):
            return None
        img = matplotlib.image.imread(local)
    fig = Figure(figsize=(img.shape[1] / DPI, img.shape[0] / DPI))
    fig.figimage(img, resize=False)  # 1:1 pixels at DPI: the PNG is the artifact's image again
    return fig


@_figure("paper_table")
def paper_table_figure(runs: list[Run]) -> Figure:
    """Params, GMACs, blocks and layers of every paper model (ours, counted now) beside the paper's Table 1."""
    from models import counting

    def fmt(v) -> str:
        return "-" if v is None else f"{v:g}"

    def delta(ours: float, paper: float | None) -> str:
        return "-" if not paper else f"{100 * (ours - paper) / paper:+.1f}%"

    rows = []
    for name in counting.paper_models():
        c = counting.count_model(name)
        rows.append([name, str(c.blocks), fmt(c.paper_blocks), str(c.layers), fmt(c.paper_layers), f"{c.params_m:g}",
                     fmt(c.paper_params_m), delta(c.params_m, c.paper_params_m), f"{c.gmacs:g}", fmt(c.paper_gmacs),
                     delta(c.gmacs, c.paper_gmacs)])
    header = ["model", "blocks", "paper", "layers", "paper", "params M", "paper", "diff", "GMACs", "paper", "diff"]
    fig = Figure(figsize=(10, 0.8 + 0.24 * (len(rows) + 1)), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    table = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    for (r, _), cell in table.get_celld().items():
        if r > 0 and rows[r - 1][0].startswith("steps_"):
            cell.set_facecolor("#eef3fb")
    ax.set_title("params and MACs at 224 px / 1000 classes against the paper's Table 1 (- : not in the paper)")
    return fig


@_figure("throughput", Source("bench", (), r"^ratio\.", "make bench  (python -m experiments.bench)"))
def throughput_figure(runs: list[Run]) -> Figure | None:
    """Every ratio.<name> metric of the bench run as one bar (sorted by name) against the line 1."""
    run = runs[0]
    keys = sorted(k for k in run.data.metrics if k.startswith("ratio."))
    if not keys:
        return None
    fig = Figure(figsize=(7, 1.2 + 0.35 * len(keys)), layout="constrained")
    ax = fig.subplots()
    values = [run.data.metrics[k] for k in keys]
    ax.barh(range(len(keys)), values, color="C0")
    ax.set_yticks(range(len(keys)), [k[len("ratio."):] for k in keys])
    ax.invert_yaxis()
    ax.axvline(1, color="black", linewidth=0.8)
    ax.margins(x=0.12)  # room for the value labels
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    ax.set(xlabel="throughput ratio", title=f"throughput ratios: {_label(run)}")
    return fig


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class FiguresResult:
    """What `make_figures` did: files per figure made, reason (with the command) per figure skipped, the run ids
    each figure read, and the ``figures`` MLflow run."""
    made: dict[str, list[Path]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    run_id: str | None = None


def _names(value: str | Sequence[str] | None) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return list(dict.fromkeys(v.strip() for v in items if v.strip()))


def _pinned(ids: list[str]) -> list[Run]:
    client, runs = MlflowClient(), []
    for rid in ids:
        try:
            runs.append(client.get_run(rid))
        except MlflowException:
            raise TrackingError(f"--runs: no run {rid!r} in {mlflow.get_tracking_uri()}") from None
    return runs


def _newest(source: Source) -> list[Run]:
    """The newest FINISHED run of `source` with a metric matching its regex (among the newest 100 of its kind)."""
    df = find_runs(source.kind, dict(source.tags), max_results=100)
    if df.empty:
        return []
    cols = [c for c in df.columns if c.startswith("metrics.") and re.search(source.needs, c[len("metrics."):])]
    usable = df[(df["status"] == "FINISHED") & df[cols].notna().any(axis=1)] if cols else df.iloc[:0]
    return [MlflowClient().get_run(usable.iloc[0]["run_id"])] if len(usable) else []


def _choose(name: str, pinned: list[Run]) -> list[Run]:
    source = SOURCES[name]
    if source is None:
        return []
    mine = [r for r in pinned if source.fits(r)]
    if source.max_runs is not None and len(mine) > source.max_runs:
        raise UserError(f"--runs: figure {name} takes {source.max_runs} run; pinned "
                         f"{', '.join(r.info.run_id for r in mine)}")
    return mine or _newest(source)


def make_figures(out: str | Path = "experiments/figures", only: str | Sequence[str] | None = None,
                 runs: str | Sequence[str] | None = None, tracking_uri: str | None = None,
                 echo: Callable[[str], None] = print) -> FiguresResult:
    """Write ``<out>/<name>.png`` and ``.pdf`` for every figure (or those in `only`) from MLflow runs (`runs`:
    pinned run ids, else the newest fitting), log them to one MLflow run of kind ``figures``, and report each
    figure made or skipped (with the command that makes its runs) through `echo`.

    `only` and `runs` are lists or comma-separated strings. Unknown figure names and run ids, and pinned runs
    that fit no chosen figure, raise a one-line ValueError / TrackingError before anything is written.
    """
    configure(tracking_uri)
    names = _names(only) or list(FIGURES)
    bad = [n for n in names if n not in FIGURES]
    if bad:
        raise UserError(f"--only: unknown figure {bad[0]!r}; allowed: {', '.join(FIGURES)}")
    pinned = _pinned(_names(runs))
    # Resolve every figure's runs before anything is written, so a bad --runs fails cleanly.
    chosen = {name: _choose(name, pinned) for name in names}
    used = {r.info.run_id for rs in chosen.values() for r in rs}
    for r in pinned:
        if r.info.run_id not in used:
            raise UserError(f"--runs: run {r.info.run_id} ({r.data.tags.get(KIND_TAG, '?')}) feeds none of the "
                             f"figures {', '.join(names)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = FiguresResult()
    params = {"out": str(out), "only": ",".join(names), "runs": ",".join(r.info.run_id for r in pinned) or "newest"}
    with tracked_run("figures", params, run_name="figures") as active:
        result.run_id = active.info.run_id
        for name in tqdm(names, desc="figures", unit="figure", disable=None):
            source, sel = SOURCES[name], chosen[name]
            ids = [r.info.run_id for r in sel]
            fig = None
            if source is None or sel:
                with _style():
                    fig = FIGURES[name](sel)
                    files = _save(fig, out / name) if fig is not None else []
            if fig is None:
                why = (f"run {', '.join(ids)} lacks its data" if sel else
                       f"no finished {source.describe()} with a metric matching {source.needs}")
                result.skipped[name] = f"{why}; make one with: {source.command}"
                echo(f"skipped {name}: {result.skipped[name]}")
                continue
            for f in files:
                mlflow.log_artifact(str(f))
            result.made[name], result.sources[name] = files, ids
            echo(f"made {name}: {', '.join(map(str, files))}" + (f" (runs {', '.join(ids)})" if ids else ""))
        if result.sources:
            mlflow.log_params({f"source.{n}": ",".join(ids) or "none" for n, ids in result.sources.items()})
        log_dict_artifact({"made": {n: [f.name for f in fs] for n, fs in result.made.items()},
                           "skipped": result.skipped, "sources": result.sources}, "figures.json")
    echo(f"figures run {result.run_id} ({len(result.made)} made, {len(result.skipped)} skipped) -> {out}")
    return result
