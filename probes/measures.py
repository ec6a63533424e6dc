"""Measures on top of linear probes: label levels, online (prequential) MDL, equal-width controls, small-probe
curves, bootstrap CIs and the division-of-labour score; `measure` runs them all over a set of features
(path label -> array) and `metrics_of` names the results (metric names: see `probes.run`).

Division of labour (DoL), for a measure m where larger = better:
    DoL = (m_slow - m_fast | coarse) - (m_slow - m_fast | fine)
Positive = the paper's claim (the slow path is relatively better at the abstract labels, the fast path at the
detail). For accuracy m = per-image correctness on the test set. For MDL m = -(codelength / uniform
codelength), the per-example code length as a fraction of the uniform code log2(K) of its level: the fraction
makes coarse (few classes) and fine (many) comparable, and the minus sign keeps "positive = claim" (shorter
codes are better). CIs: percentile bootstrap over examples, resampled jointly for all four terms (paired).

Out of core: features given as `probes.shards.ShardedArray` (anything with ``chunks()``) are streamed: the probes
(`linear.fit_probe_streamed`), the online MDL (each block's prefix a row mask, never gathered), the PCA control
(covariance accumulated chunk by chunk) and the random-channel controls. Level ``detail`` is in-memory only.
"""
from __future__ import annotations

import functools
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from models.errors import UserError
from probes.choices import LEVELS

from .linear import (CS, ProbeFit, Standardiser, stream_standardiser, fit_probe, fit_probe_streamed,
                     fit_proba_grid, fit_proba_grid_streamed, flat, parallel_fits, small_blas)

__all__ = ["LEVELS", "MDL_FRACTIONS", "level_labels", "detail_groups", "MDLResult", "prequential_mdl",
           "geometric_ks", "pca_k", "random_k", "k_control", "bootstrap_ci", "division_of_labour", "Labels",
           "measure", "metrics_of"]

# Block boundaries as fractions of the training set (Voita & Titov 2020): 0.1%, 0.2%, ..., 50%, 100%.
MDL_FRACTIONS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)
_SMOOTH = 1e-3  # mixed-in uniform mass: a class the block's probe never saw costs log2(K/1e-3), not infinity
_KEY_BAD = re.compile(r"[^\w\-. /]")  # characters MLflow refuses in metric names


def level_labels(ds, level: str) -> np.ndarray:
    """Labels of `ds` at `level` (``coarse`` or ``fine``)."""
    if level not in ("coarse", "fine"):
        raise ValueError(f"unknown level {level!r}; allowed: coarse, fine")
    return (ds.coarse if level == "coarse" else ds.fine).numpy()


def detail_groups(fine_to_coarse: list[int]) -> dict[int, list[int]]:
    """Coarse group -> its fine classes, for the groups with at least two (detail is only defined there)."""
    groups: dict[int, list[int]] = {}
    for f, c in enumerate(fine_to_coarse):
        groups.setdefault(c, []).append(f)
    return {c: fs for c, fs in groups.items() if len(fs) >= 2}


@dataclass
class MDLResult:
    """Online code length of the training labels given the features, in bits.

    `per_example` is the code length of each example (in the seeded order `order`, first block uniform);
    `uniform` = n log2(K); `ratio` = bits / uniform (lower = more compressible).
    """
    bits: float
    uniform: float
    per_example: np.ndarray
    order: np.ndarray
    n_classes: int

    @property
    def ratio(self) -> float:
        return self.bits / self.uniform


def prequential_mdl(x: np.ndarray, y: np.ndarray, n_classes: int, *, C: float | None = None,
                    Cs: tuple[float, ...] = CS, probe: str = "auto", seed: int = 0,
                    fractions: tuple[float, ...] = MDL_FRACTIONS) -> MDLResult:
    """Prequential MDL: shuffle (seeded), send the first block with a uniform code, then each next block with
    a probe trained on everything before it. Same seed and length -> same order, so results pair up across
    features and levels.

    `C` fixes the regularisation; with None each block is coded with the C of `Cs` that coded the previous
    block best (a choice the receiver can repeat, so it costs no bits). One C tuned on the whole train set
    over-fits the small early blocks and can make the online code longer than the uniform one.
    """
    if _streamed(x):
        return _mdl_streamed(x, np.asarray(y), n_classes, C=C, Cs=Cs, seed=seed, fractions=fractions)
    x, y = flat(x), np.asarray(y)
    n = len(y)
    order = np.random.default_rng([seed, 13]).permutation(n)
    x, y = x[order], y[order]
    ends = sorted({min(n, max(1, int(round(f * n)))) for f in fractions} | {n})
    grid = (C,) if C is not None else tuple(Cs)
    pick = len(grid) // 2  # the first coded block: a middling C
    bits = np.empty(n)
    bits[:ends[0]] = np.log2(n_classes)
    solution = None  # each block's probes start from the previous block's (same C): the solves converge, so
    for start, stop in zip(ends, ends[1:]):  # this changes their time, not the code lengths
        probas, solution = fit_proba_grid(x[:start], y[:start], x[start:stop], n_classes, Cs=grid, probe=probe,
                                          seed=seed, init=solution)
        cost = []
        for p in probas:
            p = (1 - _SMOOTH) * p + _SMOOTH / n_classes
            cost.append(-np.log2(p[np.arange(stop - start), y[start:stop]]))
        bits[start:stop] = cost[pick]
        pick = int(np.argmin([c.sum() for c in cost]))
    return MDLResult(bits=float(bits.sum()), uniform=float(n * np.log2(n_classes)), per_example=bits, order=order,
                     n_classes=n_classes)


def _streamed(x) -> bool:
    return hasattr(x, "chunks")


def _mdl_streamed(x, y: np.ndarray, n_classes: int, *, C: float | None, Cs: tuple[float, ...], seed: int,
                  fractions: tuple[float, ...]) -> MDLResult:
    """`prequential_mdl` over streamed features: the same order, blocks and C choice; each block's training
    prefix and coded block are row masks over the shards (rows visited in storage order, coded in stream order)."""
    n = len(y)
    order = np.random.default_rng([seed, 13]).permutation(n)
    ends = sorted({min(n, max(1, int(round(f * n)))) for f in fractions} | {n})
    grid = (C,) if C is not None else tuple(Cs)
    pick = len(grid) // 2
    bits = np.empty(n)
    bits[:ends[0]] = np.log2(n_classes)
    solution = None  # warm starts as in `prequential_mdl`
    for start, stop in zip(ends, ends[1:]):
        train, block = np.zeros(n, bool), np.zeros(n, bool)
        train[order[:start]], block[order[start:stop]] = True, True
        probas, solution = fit_proba_grid_streamed(x, train, block, y, n_classes, Cs=grid, seed=seed, init=solution)
        at = np.searchsorted(np.flatnonzero(block), order[start:stop])  # storage order -> stream order
        cost = []
        for p in probas:
            p = (1 - _SMOOTH) * p[at] + _SMOOTH / n_classes
            cost.append(-np.log2(p[np.arange(stop - start), y[order[start:stop]]]))
        bits[start:stop] = cost[pick]
        pick = int(np.argmin([c.sum() for c in cost]))
    return MDLResult(bits=float(bits.sum()), uniform=float(n * np.log2(n_classes)), per_example=bits, order=order,
                     n_classes=n_classes)


def geometric_ks(width: int, extra: tuple[int, ...] = (), base: int = 4) -> list[int]:
    """1, base, base^2, ... below `width`, plus `width` and `extra` (each <= width)."""
    ks, k = {width} | {e for e in extra if 1 <= e <= width}, 1
    while k < width:
        ks.add(k)
        k *= base
    return sorted(ks)


def pca_k(x_train: np.ndarray, x_test: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Project standardised features onto the top-k principal components of train: ``[N, k]`` each."""
    if _streamed(x_train):
        return _pca_streamed(x_train, x_test, k)
    xtr, xte = flat(x_train), flat(x_test)
    if not 1 <= k <= min(xtr.shape):
        raise UserError(f"PCA to k={k}: allowed 1..{min(xtr.shape)} for features {xtr.shape}")
    st = Standardiser.fit(xtr)
    a, b = st(xtr), st(xte)
    # The components from the D x D covariance, as the streamed PCA does: the SVD of the [N, D] matrix took 6 s
    # per call on 2 busy cores, this a few ms; the same subspace (up to sign and float rounding).
    with small_blas(a.shape[1] ** 2):
        _, vecs = np.linalg.eigh(a.T.astype(np.float64) @ a)
    v = vecs[:, ::-1][:, :k].astype(np.float32)  # eigh sorts ascending: the top k are the last columns
    return a @ v, b @ v


def _pca_streamed(x_train, x_test, k: int):
    """`pca_k` for streamed features: the components from the covariance summed chunk by chunk (the same
    subspace as the SVD of the standardised matrix), the projections applied lazily to each chunk."""
    d = int(np.prod(x_train.shape[1:]))
    if not 1 <= k <= min(len(x_train), d):
        raise UserError(f"PCA to k={k}: allowed 1..{min(len(x_train), d)} for features {(len(x_train), d)}")
    st = stream_standardiser(x_train, None)
    cov = np.zeros((d, d))
    for c in x_train.chunks():
        a = st(c.reshape(len(c), d).astype(np.float32)).astype(np.float64)
        cov += a.T @ a
    _, vecs = np.linalg.eigh(cov)
    v = vecs[:, ::-1][:, :k].astype(np.float32)  # eigh sorts ascending: the top k are the last columns

    def project(c: np.ndarray) -> np.ndarray:
        return st(c.reshape(len(c), d).astype(np.float32)) @ v
    return x_train.select(project), x_test.select(project)


def random_k(x_train: np.ndarray, x_test: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k channels drawn at random (seeded) from the channel axis (last); tokens features keep their tokens."""
    width = x_train.shape[-1]
    if not 1 <= k <= width:
        raise ValueError(f"random channels k={k}: allowed 1..{width}")
    idx = np.sort(np.random.default_rng([seed, 17, k]).choice(width, k, replace=False))
    if _streamed(x_train):
        return x_train.select(lambda a: a[..., idx]), x_test.select(lambda a: a[..., idx])
    return x_train[..., idx], x_test[..., idx]


def k_control(x_train, y_train, x_test, y_test, k: int, *, method: str, draws: int = 3, C: float = 1.0,
              probe: str = "auto", seed: int = 0) -> tuple[float, np.ndarray]:
    """Accuracy with features cut to k dims (``pca``, or ``random`` channels averaged over `draws` seeded draws).

    Returns (accuracy, per-image correctness; for random the fraction of draws that got the image right).
    """
    if method == "pca":
        runs = [pca_k(x_train, x_test, k)]
    elif method == "random":
        runs = [random_k(x_train, x_test, k, seed * 1000 + d) for d in range(draws)]
    else:
        raise ValueError(f"unknown method {method!r}; allowed: pca, random")
    fit = fit_probe_streamed if _streamed(x_train) else functools.partial(fit_probe, probe=probe)
    correct = np.mean([fit(a, y_train, b, y_test, C=C, seed=seed).correct for a, b in runs], axis=0)
    return float(correct.mean()), correct


def bootstrap_ci(values: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap CI of the mean of per-example `values`."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng([seed, 19])
    # 50 resamples at a time: the same draws in the same order as one [n_boot, N] array (the generator's stream
    # is sequential), without allocating two 80 MB arrays per call (2 s of page faults on 2 busy cores).
    means = np.concatenate([values[rng.integers(0, len(values), (min(50, n_boot - i), len(values)))].mean(1)
                            for i in range(0, n_boot, 50)])
    tail = (1 - level) / 2 * 100
    return float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def division_of_labour(slow_coarse: np.ndarray, fast_coarse: np.ndarray, slow_fine: np.ndarray,
                       fast_fine: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(score, ci_low, ci_high) of (slow - fast | coarse) - (slow - fast | fine) from per-example measures
    on the same examples (larger = better; see the module docstring for MDL)."""
    d = (np.asarray(slow_coarse, np.float64) - fast_coarse) - (np.asarray(slow_fine, np.float64) - fast_fine)
    return bootstrap_ci(d, n_boot=n_boot, seed=seed)


# ------------------------------------------------------------------------------------------ the pipeline

@dataclass
class Labels:
    """Labels of one split: coarse, fine and the class hierarchy."""
    coarse: np.ndarray
    fine: np.ndarray
    fine_to_coarse: list[int]
    coarse_names: list[str]

    @classmethod
    def of(cls, ds) -> "Labels":
        return cls(ds.coarse.numpy(), ds.fine.numpy(), list(ds.fine_to_coarse), list(ds.coarse_names))


def _probe_level(xtr, xte, ltr: Labels, lte: Labels, level: str, probe: str, seed: int):
    """Fits for one level: [(group or None, fit, test mask)] (detail: one fit per coarse group)."""
    if level != "detail":
        y_tr, y_te = (ltr.coarse, lte.coarse) if level == "coarse" else (ltr.fine, lte.fine)
        fit = fit_probe_streamed(xtr, y_tr, xte, y_te, seed=seed) if _streamed(xtr) else fit_probe(
            xtr, y_tr, xte, y_te, probe=probe, seed=seed)
        return [(None, fit, np.ones(len(y_te), bool))]
    if _streamed(xtr):
        raise UserError("level detail with features streamed from disk (--max-memory exceeded); allowed: coarse, "
                        "fine, both, or a --max-memory the features fit in")
    out = []
    for g in detail_groups(ltr.fine_to_coarse):
        mtr, mte = ltr.coarse == g, lte.coarse == g
        if len(np.unique(ltr.fine[mtr])) < 2 or not mte.any():
            continue
        fit = fit_probe(xtr[mtr], ltr.fine[mtr], xte[mte], lte.fine[mte], probe=probe, seed=seed)
        out.append((ltr.coarse_names[g], fit, mte))
    if not out:
        raise UserError("level detail: no coarse group has two fine classes with examples in train and test")
    return out


def _measure_one(xtr, xte, ltr: Labels, lte: Labels, path: str, level: str, *, full: bool, k_eq: int,
                 probe: str, seed: int, n_boot: int, mdl: bool, curves: bool) -> dict:
    """One (path, level) job of `measure`: its rows (per detail group, then the summary), per-image measures
    for the DoL scores, the main fit (None for detail) and small-probe curve points."""
    rows, curve_pts, main_fit = [], [], None
    results = _probe_level(xtr, xte, ltr, lte, level, probe, seed)
    correct = np.full(len(lte.fine), np.nan)
    for group, fit, mask in results:
        correct[mask] = fit.correct
        if group is not None:
            rows.append(dict(path=path, level=level, group=group, width=xtr.shape[-1], acc=fit.acc,
                             bal_acc=fit.bal_acc, xent=fit.xent, C=fit.C, probe=fit.backend))
    fit = results[0][1]
    ok = ~np.isnan(correct)
    _, lo, hi = bootstrap_ci(correct[ok], n_boot=n_boot, seed=seed)
    sizes = [m.sum() for _, _, m in results]
    # Detail pools its groups: accuracy and cross-entropy over all their test images, balanced accuracy
    # the mean of the groups' (each group is balanced within itself).
    row = dict(path=path, level=level, group="", width=xtr.shape[-1], n_train=len(xtr), n_test=int(ok.sum()),
               acc=float(correct[ok].mean()), acc_ci_low=lo, acc_ci_high=hi,
               bal_acc=float(np.mean([r[1].bal_acc for r in results])),
               xent=float(np.average([r[1].xent for r in results], weights=sizes)), C=fit.C, probe=fit.backend)
    per = {"correct": correct}
    if level != "detail":
        main_fit = fit
    if full and level != "detail":
        y_tr, y_te = (ltr.coarse, lte.coarse) if level == "coarse" else (ltr.fine, lte.fine)
        n_classes = len(ltr.coarse_names) if level == "coarse" else len(ltr.fine_to_coarse)
        if mdl:
            res = prequential_mdl(xtr, y_tr, n_classes, probe=probe, seed=seed)
            row.update(mdl_bits=res.bits, mdl_ratio=res.ratio)
            per["mdl"] = -res.per_example / np.log2(n_classes)  # larger = better
        k = min(k_eq, xtr.shape[-1], len(xtr))
        row["k_eq"] = k
        for method, col in (("pca", "acc_pca"), ("random", "acc_rand")):
            row[col], per[col] = k_control(xtr, y_tr, xte, y_te, k, method=method, C=fit.C, probe=probe,
                                           seed=seed)
        if curves:
            for kk in geometric_ks(xtr.shape[-1]):
                acc = fit.acc if kk == xtr.shape[-1] else k_control(
                    xtr, y_tr, xte, y_te, kk, method="random", draws=1, C=fit.C, probe=probe, seed=seed)[0]
                curve_pts.append(dict(path=path, level=level, k=kk, acc=acc))
    rows.append(row)
    return {"rows": rows, "per": per, "fit": main_fit, "curve": curve_pts}


def measure(train: dict[str, np.ndarray], test: dict[str, np.ndarray], ltr: Labels, lte: Labels,
            levels: list[str], *, full: set[str] = frozenset(), pairs: list[tuple[str, str, str]] = (),
            probe: str = "auto", seed: int = 0, n_boot: int = 1000, mdl: bool = True, curves: bool = True,
            desc: str = "probes") -> tuple[list[dict], dict, list[dict], dict[tuple[str, str], ProbeFit]]:
    """Probe every path label of `train`/`test` (features) at each level.

    Paths in `full` also get MDL, the equal-width controls at k_eq (the narrowest width among the paired paths,
    else the narrowest path) and the small-probe curve. Returns (rows, DoL scores, curve points, main fits).
    """
    pair_paths = {p for _, s, f in pairs for p in (s, f)}
    k_eq = min(train[p].shape[-1] for p in (pair_paths or train))
    jobs = [(p, lv) for p in train for lv in levels]

    def job(path_level: tuple[str, str]) -> dict:
        path, level = path_level
        return _measure_one(train[path], test[path], ltr, lte, path, level, full=path in full, k_eq=k_eq,
                            probe=probe, seed=seed, n_boot=n_boot, mdl=mdl, curves=curves)

    # The (path, level) jobs share nothing: on the CPU they run side by side (`parallel_fits`; on 2 cores two
    # at once, each on one thread), the widest and finest first so that no long job starts last. They are
    # gathered in job order: the output does not depend on which finished first.
    def cost(path_level: tuple[str, str]) -> int:
        return train[path_level[0]].shape[-1] * (len(ltr.coarse_names) if path_level[1] == "coarse" else
                                                 len(ltr.fine_to_coarse))

    # Streamed features keep their promise of one chunk in memory: one job at a time.
    streamed = any(_streamed(x) for x in train.values())
    with parallel_fits(1 if streamed else len(jobs)) as workers:
        if workers == 1:
            out = {j: job(j) for j in tqdm(jobs, desc=desc, leave=False)}
        else:
            out = {}
            with ThreadPoolExecutor(workers) as pool:
                futures = {pool.submit(job, j): j for j in sorted(jobs, key=cost, reverse=True)}
                try:
                    for f in tqdm(as_completed(futures), total=len(jobs), desc=desc, leave=False):
                        out[futures[f]] = f.result()
                except BaseException:  # Ctrl-C or a failed job: start no more (those running finish)
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    rows, curve_pts, fits, per = [], [], {}, {}
    for j in jobs:
        rows += out[j]["rows"]
        curve_pts += out[j]["curve"]
        per[j] = out[j]["per"]
        if out[j]["fit"] is not None:
            fits[j] = out[j]["fit"]
    return rows, _dol(per, pairs, levels, n_boot, seed), curve_pts, fits


def _dol(per: dict, pairs, levels: list[str], n_boot: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """Division-of-labour scores for each (slow, fast) pair: coarse vs fine, and coarse vs detail."""
    out = {}
    for suffix, slow, fast in pairs:
        for other in [lv for lv in ("fine", "detail") if lv in levels and "coarse" in levels]:
            a, b, c, d = per[slow, "coarse"], per[fast, "coarse"], per[slow, other], per[fast, other]
            tail = suffix if other == "fine" else f".detail{suffix}"
            for key in ("correct", "mdl", "acc_pca", "acc_rand") if other == "fine" else ("correct",):
                if all(key in t for t in (a, b, c, d)):
                    ok = ~np.isnan(c[key]) if key == "correct" else slice(None)
                    name = "acc" if key == "correct" else key
                    out[f"{name}{tail}"] = division_of_labour(a[key][ok], b[key][ok], c[key][ok], d[key][ok],
                                                              n_boot=n_boot, seed=seed)
    randoms = [v[0] for k, v in out.items() if re.fullmatch(r"acc\.random\d+", k)]
    if randoms:
        out["acc.random_mean"] = (float(np.mean(randoms)), float("nan"), float("nan"))
    return out


def _key(text: str) -> str:
    return _KEY_BAD.sub("_", text)


def metrics_of(rows: list[dict], dol: dict, prefix: str = "") -> dict[str, float]:
    """Rows and DoL scores -> MLflow metric names (module docstring)."""
    out = {}
    for r in rows:
        base = f"{r['path']}.{r['level']}" + (f".{_key(r['group'])}" if r.get("group") else "")
        cols = {"acc": "acc", "acc_ci_low": "acc", "acc_ci_high": "acc", "bal_acc": "bal_acc", "xent": "xent",
                "mdl_bits": "mdl", "mdl_ratio": "mdl_ratio", "acc_pca": "acc_pca", "acc_rand": "acc_rand"}
        for col, name in cols.items():
            if r.get(col) is not None and (col == "acc" or not r.get("group")):
                tail = {"acc_ci_low": ".ci_low", "acc_ci_high": ".ci_high"}.get(col, "")
                out[f"{prefix}{name}.{base}{tail}"] = r[col]
    for key, (score, lo, hi) in dol.items():
        out[f"{prefix}dol.{key}"] = score
        if not np.isnan(lo):
            out[f"{prefix}dol.{key}.ci_low"], out[f"{prefix}dol.{key}.ci_high"] = lo, hi
    return out
