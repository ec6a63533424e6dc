"""`probe run`: linear probes on the slow and fast paths of a frozen model, one MLflow run (kind ``probe``).

Paths (``--path``): Steps models ``slow`` (features ``slow_path``), ``fast`` (``fast_path``), ``full`` (``final``),
``all`` (the three). Baselines have no paths: ``full``, ``matched`` (their final channels split at the paired Steps
model's widths: ``matched.contiguous.slow|fast`` and ``matched.random{r}.slow|fast``), ``all`` (full + matched);
``slow``/``fast`` on a baseline is an error that points at ``matched``. Levels (``--level``): ``coarse``, ``fine``,
``both`` (coarse + fine), ``detail`` (fine labels within each coarse group), ``all``. Features come from
`probes.features.extract` (train split fits the probes, test split scores them). This is a job: it resolves the
frozen model, loads the data, calls the instruments of `probes/` and records one MLflow run.

Metric names (figures read these; <path> as in the table: slow, fast, full, matched.contiguous.slow, ...):
    acc.<path>.<level>                     test top-1; .ci_low / .ci_high = 95% bootstrap CI over test images
    bal_acc.<path>.<level>                 balanced accuracy
    xent.<path>.<level>                    probe cross-entropy on test, nats per image
    mdl.<path>.<level>                     online (prequential) code length of the train labels, bits
    mdl_ratio.<path>.<level>               that code length / the uniform code n log2 K (lower = more compressible)
    acc_pca.<path>.<level>                 accuracy on the top k_eq principal components (width fairness)
    acc_rand.<path>.<level>                accuracy on k_eq random channels, mean of 3 seeded draws
                                           (k_eq = the narrower path's width; column k_eq of results.csv)
    curve.<path>.<level>                   accuracy on k random channels (one seeded draw), step = k, k = 1, 4, 16,
                                           ..., width (small-probe curve)
    acc.<path>.detail.<group>              within-group accuracy per coarse group (groups with >= 2 fine classes);
                                           acc.<path>.detail pools the groups' test images (bal_acc: mean of groups)
    dol.acc (.ci_low, .ci_high)            division of labour on accuracy: (slow-fast | coarse) - (slow-fast | fine);
                                           positive = the paper's claim. Baselines: on matched.contiguous (= null)
    dol.mdl (.ci_low, .ci_high)            the same on MDL, per example -(code length / log2 K): positive = claim
    dol.acc_pca, dol.acc_rand (+ CIs)      the same on the equal-width controls
    dol.acc.detail (+ CIs)                 with within-group detail in place of fine
    dol.acc.random{r} (+ CIs), dol.acc.detail.random{r}, dol.acc.random_mean
                                           baselines: on each random matched split, and the mean of dol.acc.random{r}
    depth.acc.<path>.<level>               with --layers: accuracy at block k, step = k (paths slow/fast/full, or
                                           full/matched.contiguous.* for baselines); depth.dol.acc likewise
Only the primary paths get MDL and the width controls; random matched splits and depth curves get accuracy.

Memory (``--max-memory SIZE``, e.g. ``8G``): when the features of both splits would take more than SIZE in memory,
they are extracted into sharded, memory-mapped caches (`probes.features.extract_sharded`; under torchrun each
process extracts its shards) and the probes, online MDL and controls stream them chunk by chunk with the torch
solver (the in-memory ``--probe torch`` numbers up to float rounding; level ``detail`` stays in memory only). Without the option, or under the budget, nothing changes.
The run records ``max_memory``, ``feature_bytes`` and ``streamed``.
Artifacts: results.csv, results.json, confusion.png, depth.png (with --layers), probe_weights.npz.
"""
from __future__ import annotations

import csv
import io
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from experiments import tracking
from experiments.data import check_input, data_location, load_recorded
from experiments.options import ProbeConfig
from models.errors import UserError
from models.registry import is_steps
from models.sites import channel_dim, forward_paths
from probes.features import (POOLS, block_features, extract, extract_sharded, feature_bytes, feature_specs,
                             paired_steps_model)
from probes.linear import PROBES
from probes.measures import Labels, detail_groups, measure, metrics_of

__all__ = ["PATHS", "LEVEL_CHOICES", "ProbeConfig", "ProbeReport", "select_paths", "select_levels", "parse_layers",
           "run_probe", "format_table", "check_enough_data", "check_class_counts"]

PATHS = ("slow", "fast", "full", "matched", "all")
LEVEL_CHOICES = ("coarse", "fine", "both", "detail", "all")
LEVELS_OF = {"coarse": ["coarse"], "fine": ["fine"], "both": ["coarse", "fine"], "detail": ["detail"],
             "all": ["coarse", "fine", "detail"]}


@dataclass
class ProbeReport:
    """The outcome: result rows, division-of-labour scores, metrics as logged, the table, the MLflow run."""
    run_id: str | None
    rows: list[dict]
    dol: dict[str, tuple[float, float, float]]
    metrics: dict[str, float]
    table: str
    curves: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ choices

def select_paths(model, model_name: str, path: str, random_splits: int = 3
                 ) -> tuple[dict[str, str], list[tuple[str, str, str]], set[str]]:
    """(path label -> feature name, DoL pairs (suffix, slow label, fast label), labels that get every measure)."""
    if path not in PATHS:
        raise UserError(f"unknown path {path!r}; allowed: {', '.join(PATHS)}")
    specs = feature_specs(model, model_name=model_name, random_splits=random_splits)
    if "slow_path" in specs:
        if path == "matched":
            raise UserError(f"--path matched: {model_name} has real slow/fast paths; allowed: slow, fast, full, all "
                             f"(matched splits are the control on its baseline)")
        chosen = {"slow": "slow_path", "fast": "fast_path", "full": "final"}
        chosen = chosen if path == "all" else {path: chosen[path]}
        pairs = [("", "slow", "fast")] if {"slow", "fast"} <= set(chosen) else []
        return chosen, pairs, set(chosen)
    if path in ("slow", "fast"):
        steps = paired_steps_model(model_name) or "its Steps pair"
        raise UserError(f"--path {path}: {model_name} is a baseline without slow/fast paths; use --path matched "
                         f"(its final channels split at the widths of {steps}) or --path all")
    chosen = {"full": "final"} if path in ("full", "all") else {}
    pairs = []
    if path in ("matched", "all"):
        if "matched.contiguous.slow" not in specs:
            raise UserError(f"--path matched: {model_name} has no paired Steps model to copy widths from")
        for split in ["contiguous"] + [f"random{r}" for r in range(random_splits)]:
            for side in ("slow", "fast"):
                chosen[f"matched.{split}.{side}"] = f"matched.{split}.{side}"
            pairs.append(("" if split == "contiguous" else f".{split}", f"matched.{split}.slow",
                          f"matched.{split}.fast"))
    full = {p for p in chosen if "random" not in p}
    return chosen, pairs, full


def select_levels(level: str) -> list[str]:
    """--level -> the label levels to probe."""
    if level not in LEVELS_OF:
        raise UserError(f"unknown level {level!r}; allowed: {', '.join(LEVEL_CHOICES)}")
    return LEVELS_OF[level]


def parse_layers(layers: str, n_blocks: int) -> list[int]:
    """``none`` -> [], ``all`` -> every block, ``"0,3,5"`` -> those block indices."""
    layers = (layers or "none").strip()
    if layers == "none":
        return []
    if layers == "all":
        return list(range(n_blocks))
    try:
        ks = sorted({int(v) for v in layers.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--layers {layers!r}; allowed: none, all, or block indices like 0,3,7") from None
    bad = [k for k in ks if not 0 <= k < n_blocks]
    if bad or not ks:
        raise UserError(f"--layers {layers!r}: block {bad[0] if bad else '?'} out of range; "
                         f"allowed: 0..{n_blocks - 1}")
    return ks


# -------------------------------------------------------------------------------------------------- the run

def _check_choices(cfg: ProbeConfig) -> list[str]:
    if cfg.path not in PATHS:
        raise UserError(f"unknown path {cfg.path!r}; allowed: {', '.join(PATHS)}")
    if cfg.pool not in POOLS:
        raise UserError(f"unknown pool {cfg.pool!r}; allowed: {', '.join(POOLS)}")
    if cfg.probe not in PROBES:
        raise UserError(f"unknown probe {cfg.probe!r}; allowed: {', '.join(PROBES)}")
    return select_levels(cfg.level)


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory(text: str) -> int:
    """'8G', '512M', '1.5G', '4096' (bytes; K/M/G/T are powers of 1024, an optional trailing B) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--max-memory {text!r}: allowed a positive size such as 8G, 512M or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _size(nbytes: int) -> str:
    """Bytes as a short binary size: 512.0 KiB, 3.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    return ""


def run_probe(cfg: ProbeConfig, echo: Callable[[str], None] = print) -> ProbeReport | None:
    """Load the frozen model, extract features, probe, print the table, log one MLflow run of kind ``probe``.

    Under torchrun (``torchrun --nproc_per_node=N -m experiments.cli run ...``) every process extracts its shards
    of the sharded feature cache (`probes.features.extract_sharded`) and rank 0 alone probes, records and prints;
    the other ranks return None. The probes then stream from the shards, as with --max-memory.
    """
    from experiments.train import init_distributed

    dist, _ = init_distributed("auto")  # extraction picks its device as in one process (cuda:LOCAL_RANK, or cpu)
    try:
        return _run_probe(cfg, echo if dist.main else (lambda msg: None), dist)
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_probe(cfg: ProbeConfig, echo: Callable[[str], None], dist) -> ProbeReport | None:
    levels = _check_choices(cfg)
    budget = None if getattr(cfg, "max_memory", None) is None else parse_memory(cfg.max_memory)
    tracking.configure(cfg.tracking_uri)
    model, info, name, ref = tracking.resolve_frozen(cfg.model, cfg.run, cfg.dataset, echo)
    paths, pairs, full = select_paths(model, name, cfg.path, cfg.random_splits)
    n_blocks = sum(1 for s in feature_specs(model, random_splits=0) if re.fullmatch(r"blocks\.\d+", s))
    layers = parse_layers(cfg.layers, n_blocks)
    dataset = cfg.dataset or info.get("dataset")
    train_ds = load_recorded(info, "train", dataset=dataset, data_dir=cfg.data_dir, limit=cfg.limit, seed=cfg.seed)
    test_ds = load_recorded(info, "test", dataset=dataset, data_dir=cfg.data_dir, limit=cfg.test_limit,
                            seed=cfg.seed)
    check_input(info, train_ds, name)
    check_enough_data(model, train_ds, levels, paths, full, name=name, limit=cfg.limit,
                      kw=dict(model_name=name, random_splits=cfg.random_splits, split_seed=cfg.seed))
    blocks = {k: block_features(model, k, model_name=name) for k in layers}
    if cfg.path != "all":
        blocks = {k: {p: f for p, f in v.items() if p in paths} for k, v in blocks.items()}
    names = sorted(set(paths.values()) | {f for v in blocks.values() for f in v.values()})
    params = dict(model=name, frozen=ref, frozen_uri=info.get("uri"), source_run_id=info.get("run_id"),
                  dataset=dataset, path=cfg.path, level=cfg.level, pool=cfg.pool, layers=cfg.layers, seed=cfg.seed,
                  limit=cfg.limit, test_limit=cfg.test_limit, probe=cfg.probe, random_splits=cfg.random_splits,
                  n_boot=cfg.n_boot, n_train=len(train_ds), n_test=len(test_ds))
    # Under torchrun the extraction is sharded across the processes, so the probes stream from the shards.
    streamed = dist.world_size > 1
    if streamed:
        params.update(world_size=dist.world_size, streamed=True)
        if cfg.level in ("detail", "all"):
            raise UserError(f"--level {cfg.level} under torchrun ({dist.world_size} processes: streamed probes): "
                            "allowed: --level coarse, fine or both, or one process")
        echo(f"{dist.world_size} processes extract their shards of the feature cache; rank 0 probes")
    if budget is not None:  # only then is the size measured: without the option, the run is as it always was
        fkw = dict(pool=cfg.pool, model_name=name, random_splits=cfg.random_splits, split_seed=cfg.seed)
        need = feature_bytes(model, train_ds, names, **fkw) + feature_bytes(model, test_ds, names, **fkw)
        over = need > budget
        streamed = streamed or over
        params.update(max_memory=budget, feature_bytes=need, streamed=streamed)
        if over and cfg.level in ("detail", "all"):
            raise UserError(f"--level {cfg.level} with features of {_size(need)} over --max-memory "
                            f"{cfg.max_memory}: allowed: --level coarse, fine or both, or a larger --max-memory")
        if over:
            echo(f"features need {_size(need)} > --max-memory {cfg.max_memory}: extracting into sharded "
                 "caches and streaming the probes from them")
    kw = dict(pool=cfg.pool, batch_size=cfg.batch_size, model_ref=str(info.get("uri") or ref), model_name=name,
              random_splits=cfg.random_splits, split_seed=cfg.seed)
    if not dist.main:  # the other ranks' part: their shards (extract_sharded waits for every rank's)
        extract_sharded(model, train_ds, names, **kw)
        extract_sharded(model, test_ds, names, **kw)
        return None
    tags = {"stepslab.source_run_id": info.get("run_id"), **tracking.model_tags(name), "stepslab.dataset": dataset,
            "stepslab.role": "steps" if is_steps(name) else "baseline"}
    label = "slow|fast|full" if cfg.path == "all" else cfg.path
    with tracking.tracked_run("probe", params, tags=tags, system_metrics=True,
                              run_name=tracking.run_name("probe", name, dataset, f"s{cfg.seed}", label)) as run:
        where = data_location(dataset, cfg.data_dir or info.get("data_dir"))
        for ds, context, limit in ((train_ds, "probe training", cfg.limit), (test_ds, "probe evaluation",
                                                                              cfg.test_limit)):
            tracking.log_dataset(ds, context=context, location=where, limit=limit, seed=cfg.seed)
        get = extract_sharded if streamed else extract
        ftr, fte = get(model, train_ds, names, **kw), get(model, test_ds, names, **kw)
        ltr, lte = Labels.of(train_ds), Labels.of(test_ds)
        rows, dol, curves, fits = measure({p: ftr[f] for p, f in paths.items()}, {p: fte[f] for p, f in paths.items()},
                                          ltr, lte, levels, full=full, pairs=pairs, probe=cfg.probe, seed=cfg.seed,
                                          n_boot=cfg.n_boot, mdl=cfg.mdl, curves=cfg.curves)
        metrics = metrics_of(rows, dol)
        tracking.log_metrics(metrics)
        for c in curves:
            tracking.log_metrics({f"curve.{c['path']}.{c['level']}": c["acc"]}, step=c["k"])
        depth_rows = []
        for k, feats in tqdm(blocks.items(), desc="depth", leave=False):
            bpairs = [("", p, p[:-4] + "fast") for p in feats if p.endswith("slow") and p[:-4] + "fast" in feats]
            brows, bdol, _, _ = measure({p: ftr[f] for p, f in feats.items()}, {p: fte[f] for p, f in feats.items()},
                                        ltr, lte, levels, pairs=bpairs, probe=cfg.probe, seed=cfg.seed, n_boot=100,
                                        desc=f"block {k}")
            bdol = {key: v for key, v in bdol.items() if key in ("acc", "acc.detail")}
            for r in brows:
                r.update(block=k, feature=feats[r["path"]])
            depth_rows += brows
            tracking.log_metrics({m: v for m, v in metrics_of([r for r in brows if not r["group"]], bdol, "depth.")
                                  .items() if m.startswith(("depth.acc.", "depth.dol.acc")) and ".ci_" not in m},
                                 step=k)
        for r in rows:
            r["feature"] = paths[r["path"]]
        table = format_table(rows, dol)
        echo(table)
        _log_artifacts(rows + depth_rows, dol, curves, fits, metrics, params, lte, depth_rows)
        partner = partner_probe_run(name, dataset, exclude=run.info.run_id)
        mine = {"run_id": run.info.run_id, "model": name, "metrics": metrics}
        tracking.set_description(describe(name, dataset, cfg.seed, table, mine, partner))
        if partner is not None:
            pair = (mine, partner) if is_steps(name) else (partner, mine)
            tracking.log_figure(compare_figure(*pair, dataset=dataset), "compare_dol.png")
            tracking.log_dict_artifact({"steps": pair[0], "baseline": pair[1]}, "compare_dol.json")
        other = tracking.model_tags(name).get("stepslab.pair", "").replace(name, "").replace(" vs ", "")
        if partner or other:
            echo(f"{partner['model']} was probed on {dataset} in run {partner['run_id']}: probe ui shows the two side "
                 "by side" if partner else f"probe {other} on {dataset} too, then see the two side by side: probe ui")
        echo(f"probe run {run.info.run_id} (model {name}, frozen run {info.get('run_id')})")  # last: scripts read it
    return ProbeReport(run.info.run_id, rows + depth_rows, dol, metrics, table, curves)


DOL_METRICS = ("dol.acc", "dol.mdl", "dol.acc_pca")


def partner_probe_run(name: str, dataset: str, exclude: str | None = None) -> dict | None:
    """The newest FINISHED probe run of `name`'s pair partner (Steps model <-> its matched baseline) on
    `dataset`: run id, model and metrics; None when there is none."""
    pair = tracking.model_tags(name).get("stepslab.pair")
    if pair is None:
        return None
    df = tracking.find_runs("probe", {"stepslab.pair": pair, "stepslab.dataset": dataset})
    if df.empty:
        return None
    df = df[(df["status"] == "FINISHED") & (df["tags.stepslab.model"] != name) & (df["run_id"] != exclude)]
    if df.empty:
        return None
    row = df.iloc[0]
    metrics = {c[len("metrics."):]: float(v) for c, v in row.items() if c.startswith("metrics.") and v == v}
    return {"run_id": row["run_id"], "model": row["tags.stepslab.model"], "metrics": metrics}


def _dol_text(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "-"
    lo, hi = metrics.get(f"{key}.ci_low"), metrics.get(f"{key}.ci_high")
    return f"{metrics[key]:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else "")


def describe(name: str, dataset: str, seed: int, table: str, mine: dict, partner: dict | None) -> str:
    """The probe run's note in the UI (Markdown): the result table, and its DoL beside its partner's."""
    role = "Steps model" if is_steps(name) else "baseline, matched channel splits: the null"
    # The first line is what the runs table's Description column shows: plain words, the headline number.
    lines = [f"{name} ({role}) probed on {dataset}, seed {seed}: dol.acc {_dol_text(mine['metrics'], 'dol.acc')}.",
             "", "```", table, "```", ""]
    if partner is not None:
        steps, base = (mine, partner) if is_steps(name) else (partner, mine)
        lines += [f"Division of labour, Steps beside its baseline (probe run `{partner['run_id']}`):", "",
                  f"| metric | {steps['model']} | {base['model']} (null) |", "|---|---|---|"]
        lines += [f"| {k} | {_dol_text(steps['metrics'], k)} | {_dol_text(base['metrics'], k)} |"
                  for k in DOL_METRICS]
    else:
        lines.append("No probe run of the partner model on this dataset yet: probe it to see the two side by side.")
    return "\n".join(lines) + "\n"


def compare_figure(steps: dict, base: dict, *, dataset: str):
    """The DoL metrics of a Steps probe run beside its baseline's, with their 95% intervals (one panel each)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in DOL_METRICS if k in steps["metrics"] or k in base["metrics"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (run, colour) in enumerate(((steps, "C0"), (base, "C7"))):
            m = run["metrics"]
            if key not in m:
                continue
            lo, hi = m.get(f"{key}.ci_low", m[key]), m.get(f"{key}.ci_high", m[key])
            ax.errorbar([i], [m[key]], yerr=[[m[key] - lo], [hi - m[key]]], fmt="o", color=colour, capsize=4)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks([0, 1], [steps["model"], base["model"] + "\n(null)"], fontsize=8)
        ax.set_xlim(-0.6, 1.6)
        ax.set_title(key)
    fig.suptitle(f"division of labour on {dataset}: Steps beside its baseline (95% CI)", fontsize=9)
    fig.tight_layout()
    return fig


def check_enough_data(model, train_ds, levels: list[str], paths: dict[str, str], full: set[str], *, name: str,
                      limit: int | None, kw: dict) -> None:
    """Refuse data too small for the probes to mean anything, before any run is opened (one line, exit 2).

    Each probe picks its regularisation on a stratified validation split, so every class of a probed level
    needs at least two training images. The equal-width controls fit probes on the top k_eq principal
    components (k_eq = the narrower path's width), and n centred training images have at most n - 1 of them.
    """
    more = f"raise --limit (now {limit})" if limit else "use a larger dataset"
    check_class_counts(train_ds, levels, more)
    if not full or levels == ["detail"]:
        return
    # The paths' widths from one image: k_eq as probes.measures computes it.
    specs = feature_specs(model, model_name=kw["model_name"], random_splits=kw["random_splits"],
                          split_seed=kw["split_seed"])
    sites = sorted({specs[f].site for f in paths.values()})
    with torch.no_grad():
        out = forward_paths(model.eval(), train_ds.normalise(train_ds.images[:1]), sites)
    k_eq = min(specs[f].select(np.zeros((1, out[specs[f].site].shape[channel_dim(model)]))).shape[-1]
               for f in paths.values())
    if k_eq > len(train_ds) - 1:
        raise UserError(f"too little data for a probe: the equal-width controls use k_eq={k_eq} principal "
                        f"components, but {len(train_ds)} training images span at most {len(train_ds) - 1}; "
                        f"{more} to at least {k_eq + 1}")


def check_class_counts(train_ds, levels: list[str], more: str) -> None:
    """A one-line error unless every class of each probed level has at least 2 training images (`more` says
    how to get more)."""
    for level in levels:
        if level == "coarse":
            counts, names = np.bincount(train_ds.coarse.numpy(), minlength=train_ds.num_coarse), train_ds.coarse_names
        else:  # fine, and detail (fine classes within each coarse group with >= 2 of them)
            counts, names = np.bincount(train_ds.fine.numpy(), minlength=train_ds.num_fine), train_ds.fine_names
            if level == "detail":
                probed = {c for group in detail_groups(train_ds.fine_to_coarse).values() for c in group}
                counts = np.where([c in probed for c in range(len(counts))], counts, 2)
        if counts.min() < 2:
            c = int(counts.argmin())
            raise UserError(f"too little data for a probe: class {names[c]!r} has {int(counts[c])} training "
                            f"image(s) at level {level}, at least 2 per class are needed; {more}")


def format_table(rows: list[dict], dol: dict) -> str:
    """path x level: width, accuracy [95% CI], balanced accuracy, MDL, equal-width controls; then DoL lines."""
    def f(v, fmt="{:.3f}"):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else fmt.format(v)

    header = ["path", "level", "width", "acc [95% CI]", "bal_acc", "xent", "MDL bits (ratio)", "k_eq",
              "acc@k pca", "acc@k rand"]
    body = [[r["path"], r["level"], str(r["width"]), f"{r['acc']:.3f} [{f(r['acc_ci_low'])}, {f(r['acc_ci_high'])}]",
             f(r["bal_acc"]), f(r["xent"]),
             "-" if r.get("mdl_bits") is None else f"{r['mdl_bits']:.0f} ({r['mdl_ratio']:.3f})",
             f(r.get("k_eq"), "{}"), f(r.get("acc_pca")), f(r.get("acc_rand"))]
            for r in rows if not r.get("group")]
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for key, (s, lo, hi) in dol.items():
        ci = "" if np.isnan(lo) else f" [{lo:+.3f}, {hi:+.3f}]"
        lines.append(f"division of labour {key}: {s:+.3f}{ci}")
    return "\n".join(lines)


def _log_artifacts(rows, dol, curves, fits, metrics, params, labels: Labels, depth_rows) -> None:
    import mlflow

    cols = sorted({k for r in rows for k in r}, key=lambda c: (c not in ("path", "level", "group", "block"), c))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    mlflow.log_text(buf.getvalue(), "results.csv")
    tracking.log_dict_artifact({"params": params, "rows": rows, "dol": {k: dict(zip(("score", "ci_low", "ci_high"), v))
                                                                         for k, v in dol.items()},
                                "curves": curves, "metrics": metrics}, "results.json")
    tracking.log_figure(_confusion_figure(fits, labels), "confusion.png")
    if depth_rows:
        tracking.log_figure(_depth_figure(depth_rows), "depth.png")
    weights = {}
    for (path, level), fit in fits.items():
        for part in ("coef", "intercept", "classes"):
            weights[f"{path}.{level}.{part}"] = getattr(fit, part)
        weights[f"{path}.{level}.mean"] = fit.standardiser.mean
        weights[f"{path}.{level}.scale"] = fit.standardiser.scale
        weights[f"{path}.{level}.C"] = np.array(fit.C)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "probe_weights.npz", **weights)
        mlflow.log_artifact(str(Path(tmp) / "probe_weights.npz"))


def _confusion_figure(fits: dict, labels: Labels):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(dict.fromkeys(p for p, _ in fits))
    levels = list(dict.fromkeys(lv for _, lv in fits))
    fig, axes = plt.subplots(len(levels), len(paths), figsize=(3 * len(paths), 3 * len(levels)), squeeze=False)
    for i, level in enumerate(levels):
        y = labels.coarse if level == "coarse" else labels.fine
        k = len(labels.coarse_names) if level == "coarse" else len(labels.fine_to_coarse)
        for j, path in enumerate(paths):
            fit, ax = fits.get((path, level)), axes[i][j]
            if fit is not None:
                cm = np.zeros((k, k))
                np.add.at(cm, (y, fit.pred), 1)
                ax.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), vmin=0, vmax=1, cmap="Blues")
                ax.set_title(f"{path} / {level}: {fit.acc:.2f}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    plt.close(fig)
    return fig


def _depth_figure(rows: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(dict.fromkeys(r["level"] for r in rows))
    fig, axes = plt.subplots(1, len(levels), figsize=(4.5 * len(levels), 3.2), squeeze=False)
    for ax, level in zip(axes[0], levels):
        for path in dict.fromkeys(r["path"] for r in rows):
            pts = sorted((r["block"], r["acc"]) for r in rows if r["level"] == level and r["path"] == path
                         and not r["group"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=path)
        ax.set(title=level, xlabel="block", ylabel="probe accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig
