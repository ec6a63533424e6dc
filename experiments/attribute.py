"""`probe attribute`: path shares, path maps and causal tests of a frozen model, one MLflow run (kind ``attribute``).

A job: it resolves the frozen model, loads the data, chains the instruments of `probes.attribution` and
`probes.causal` (their module docstrings define every measure and metric name) and records the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from experiments import tracking
from experiments.data import check_input, data_location, load_recorded
from experiments.probe_run import check_class_counts
from experiments.options import AttributeConfig
from models.errors import UserError
from probes import causal
from probes.attribution import (LEVELS, LOW_FREQ, METHODS, PATHS, CompletenessError, causal_tests, check_choice,
                                matched_split, path_maps, path_shares, shares_by_class)
from probes.causal import ABLATIONS
from probes.runtime import LabeledImages, resolve_device

__all__ = ["AttributionResult", "run_attribution", "attribute", "format_summary"]


@dataclass
class AttributionResult:
    """What `run_attribution` measured: metrics, JSON tables and the map grid figure (matplotlib)."""
    metrics: dict[str, float] = field(default_factory=dict)
    tables: dict[str, object] = field(default_factory=dict)
    figure: object = None
    run_id: str | None = None   # the MLflow run, when `attribute` logged one


def run_attribution(model: nn.Module, train_ds: LabeledImages, test_ds: LabeledImages, cfg: AttributeConfig, *,
                    model_name: str | None = None, progress: bool | None = None, log=None) -> AttributionResult:
    """Path shares, path maps and causal tests of `model` (probes.attribution's docstring). Probes train on
    `train_ds`; everything else runs on `test_ds`. `log(metrics)` is called after each stage (e.g.
    tracking.log_metrics), so the delta metrics are recorded before a `CompletenessError` is raised."""
    path, method, n_steps, modes, pool = cfg.path, cfg.method, cfg.n_steps, cfg.modes, cfg.pool
    batch_size, internal_batch_size, draws, seed = cfg.batch_size, cfg.internal_batch_size, cfg.draws, cfg.seed
    _check(cfg)
    log = log or (lambda metrics: None)
    device = resolve_device(cfg.device)
    model.to(device).eval()
    paths = ("slow", "fast") if path == "both" else (path,)
    split = matched_split(model, model_name)
    image = test_ds.normalise(test_ds.images[:1]).to(device)
    cuts = {"merge": causal.merge_cut(model, image, split), "final": causal.final_cut(model, image, split)}
    res = AttributionResult()
    m = res.metrics

    # 1. Path shares and completeness.
    by_class, deltas = [], {"delta.max": [], "delta.rel": [], "delta.rel_max": []}
    for cut in cuts.values():
        for level in LEVELS:
            sh = path_shares(model, test_ds, cut, level=level, n_steps=n_steps, batch_size=batch_size,
                             internal_batch_size=internal_batch_size, device=device, progress=progress)
            s = sh.summary()
            for k in deltas:
                deltas[k].append(s[k])
            by_class += shares_by_class(sh, test_ds.fine_names if level == "fine" else test_ds.coarse_names)
            if cut.name == "final":
                m.update({f"share_final.{p}.{level}": s[f"share.{p}"] for p in ("slow", "fast")})
                continue
            m.update({f"{k}.{level}": v for k, v in s.items() if k.startswith(("share.", "abs_share.", "attr."))})
            m[f"outdiff.{level}"] = s["outdiff"]
    m.update({k: max(v) for k, v in deltas.items()})
    res.tables["shares_by_class"] = by_class
    log(m)
    if m["delta.rel"] > cfg.max_delta:
        raise CompletenessError(f"attributions miss completeness: mean |delta| is {m['delta.rel']:.1%} of the mean"
                                f" |F(x) - F(baseline)| (limit {cfg.max_delta:.1%}); raise --steps (now {n_steps}) "
                                "or --max-delta")

    # 2. Where each path looks.
    maps, stats, res.figure = path_maps(model, train_ds, test_ds, paths, method=method, pool=pool, n_steps=n_steps,
                                        batch_size=batch_size, internal_batch_size=internal_batch_size, seed=seed,
                                        device=device, model_name=model_name, grid_images=cfg.grid_images,
                                        progress=progress)
    m.update(maps)
    res.tables["map_stats"] = stats
    log(maps)

    # 3. Causal tests at the merge point.
    caus, rows = causal_tests(model, test_ds, cuts["merge"], paths, modes=modes, draws=draws, seed=seed,
                              batch_size=max(batch_size, 64), device=device, progress=progress)
    m.update(caus)
    res.tables["causal"] = rows
    res.tables["cuts"] = {name: vars(c) for name, c in cuts.items()}
    log(caus)
    return res


def attribute(cfg: AttributeConfig, echo=print) -> AttributionResult:
    """The `probe attribute` command: resolve the frozen model, run `run_attribution` inside ONE MLflow run of
    kind ``attribute`` tagged with the frozen model's run (``stepslab.source_run_id``), log metrics and artifacts.

    `cfg.limit` test images are attributed, ablated and patched; `cfg.probe_limit` train images fit the path
    probes.
    """
    _check(cfg)
    tracking.configure(cfg.tracking_uri)
    net, info, name, ref = tracking.resolve_frozen(cfg.model, cfg.run, cfg.dataset, echo)
    dataset = cfg.dataset or info.get("dataset")
    train_ds = load_recorded(info, "train", dataset=dataset, data_dir=cfg.data_dir, limit=cfg.probe_limit,
                             seed=cfg.seed)
    test_ds = load_recorded(info, "test", dataset=dataset, data_dir=cfg.data_dir, limit=cfg.limit, seed=cfg.seed)
    check_input(info, train_ds, name)
    # The path maps fit fine-label probes on the train images.
    check_class_counts(train_ds, ["fine"], f"raise --probe-limit (now {cfg.probe_limit})")
    params = {"model": name, "ref": ref, "path": cfg.path, "method": cfg.method, "dataset": dataset,
              "limit": cfg.limit, "probe_limit": cfg.probe_limit, "seed": cfg.seed, "steps": cfg.n_steps,
              "ablations": ",".join(cfg.modes), "pool": cfg.pool, "batch_size": cfg.batch_size,
              "internal_batch_size": cfg.internal_batch_size, "draws": cfg.draws, "max_delta": cfg.max_delta,
              "low_freq": LOW_FREQ, "baseline": "zero image (dataset mean colour)",
              "test_fingerprint": test_ds.fingerprint}
    tags = {"stepslab.source_run_id": info.get("run_id") or "", **tracking.model_tags(name),
            "stepslab.dataset": dataset}
    with tracking.tracked_run("attribute", params, tags=tags,
                              run_name=tracking.run_name("attribute", name, dataset, f"s{cfg.seed}", cfg.method,
                                                         cfg.path)) as active:
        tracking.log_dataset(test_ds, context="attribution", location=data_location(dataset, cfg.data_dir or
                                                                                     info.get("data_dir")),
                             limit=cfg.limit, seed=cfg.seed)
        res = run_attribution(net, train_ds, test_ds, cfg, model_name=name, log=tracking.log_metrics)
        tracking.log_dict_artifact(res.metrics, "summary.json")
        tracking.log_dict_artifact(res.tables["shares_by_class"], "tables/shares_by_class.json")
        tracking.log_dict_artifact(res.tables["causal"], "tables/causal.json")
        tracking.log_dict_artifact({"cuts": res.tables["cuts"], "per_image": res.tables["map_stats"]},
                                   "maps/stats.json")
        tracking.log_figure(res.figure, "maps/grid.png")
        res.run_id = active.info.run_id
    return res


def _check(cfg: AttributeConfig) -> None:
    check_choice("path", cfg.path, PATHS)
    check_choice("method", cfg.method, METHODS)
    for mode in cfg.modes:
        check_choice("ablation", mode, ABLATIONS)
    if cfg.n_steps < 1 or cfg.batch_size < 1 or cfg.draws < 1:
        raise UserError(f"steps, batch size and draws must be >= 1, got {cfg.n_steps}, {cfg.batch_size}, "
                        f"{cfg.draws}")


def format_summary(metrics: dict[str, float]) -> str:
    """The headline numbers, one line each, for the terminal."""
    keys = [k for k in metrics if k.startswith(("share.", "delta.", "map.", "selectivity.", "acc.", "patch."))
            and not k.endswith((".ci_low", ".ci_high")) and ".pairs_" not in k and ".keep_" not in k]
    return "\n".join(f"{k:34s} {metrics[k]: .4f}" for k in sorted(keys))
