"""Positive controls and seed-level statistics for the division-of-labour (DoL) study.

Instruments only (arrays in, results out; no MLflow, no loading, no printing):

    subsample_fits      per seed, several probe fits on different seeded subsamples of the probe's training pool,
                        each through `probes.measures.measure` (the very measure `probe run` uses); returns the
                        per-image DoL terms of every fit
    seed_ci             the study's interval: over seeds, probe-training subsamples and test images
    planted_features    synthetic slow / fast features with a known division of labour of strength `theta` at a
                        controlled signal-to-noise ratio
    power_curve         whole simulated studies on planted features (same seeds x fits x N as the real study,
                        same measure, same interval): the effect each `theta` gives, the power to detect it, and
                        the minimum detectable effect (MDE) at 80 % power
    analytic_mde        the MDE a t-test with the real study's own standard error would have

Why this interval (`seed_ci`). A DoL estimate from one trained model varies with the test images, with the
probe's training sample (measured on the demo model: -0.021 [-0.027, -0.014] on the full split, +0.032 [+0.002,
+0.064] with 2000/500 images) and with the seed (init and data order). The study's data are
d[s, r, i]: the per-image DoL term of seed s, probe fit r (its own seeded training subsample) and test image i;
the test images are the same for every seed. The seed mean m_s = mean_{r,i} d[s, r, i] carries the init, the
data order and the probe-sample variation (the R fits are averaged inside it), so their spread across seeds,
var(m_s)/S, estimates all of those. It cannot see the test images' own sampling variance, because every seed
uses the same images; that term is var_i(mean_{s,r} d[s, r, i]) / N, added as an independent component. The
interval is a t-interval on the sum, with Welch-Satterthwaite degrees of freedom: with few seeds and a large
seed component it is close to a t_{S-1} interval on the seed means (wide at S=3, t = 4.30, which is the honest
price of three seeds); when the images dominate it approaches the bootstrap-over-images interval. A
hierarchical bootstrap (resample seeds, then fits, then images) was the alternative; with S = 3 it has 10
distinct seed resamples and underestimates the seed variance by (S-1)/S, so its intervals are too narrow
exactly where the study is weakest. With one seed the fits take the seeds' place (the interval then covers the
probe sample and the images, not the training seed) and with one fit of one seed only the images remain.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import stats

from probes.measures import Labels, measure

__all__ = ["SeedCI", "seed_ci", "subsample", "subsample_fits", "planted_features", "planted_study", "PowerCurve",
           "power_curve", "analytic_mde", "calibrate_snr"]


# ------------------------------------------------------------------------------------------ seed-level CI

@dataclass
class SeedCI:
    """A DoL estimate with the study's interval and its parts (see the module docstring)."""
    mean: float
    ci_low: float
    ci_high: float
    se: float
    df: float
    seed_means: list[float]
    se_units: float          # the seed (or fit) component of the standard error
    se_images: float         # the test-image component
    units: str               # "seeds", "fits" or "images": what the first component was computed over

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def seed_ci(d: np.ndarray, level: float = 0.95) -> SeedCI:
    """The interval of the mean of `d` [S seeds, R fits, N test images] (NaN = image not scored, e.g. detail
    outside groups with two classes; the same images in every seed and fit)."""
    d = np.asarray(d, np.float64)
    if d.ndim != 3:
        raise ValueError(f"d must be [seeds, fits, images], got shape {d.shape}")
    s, r, _ = d.shape
    seed_means = np.nanmean(d, axis=(1, 2))
    with warnings.catch_warnings():  # images never scored (all NaN) are dropped just below
        warnings.simplefilter("ignore", RuntimeWarning)
        per_image = np.nanmean(d, axis=(0, 1))
    per_image = per_image[~np.isnan(per_image)]
    n = len(per_image)
    mean = float(np.mean(seed_means))
    if s >= 2:
        units, unit_means = "seeds", seed_means
    elif r >= 2:
        units, unit_means = "fits", np.nanmean(d[0], axis=1)
    else:
        units, unit_means = "images", None
    var_u = float(np.var(unit_means, ddof=1) / len(unit_means)) if unit_means is not None else 0.0
    var_i = float(np.var(per_image, ddof=1) / n) if n > 1 else 0.0
    var = var_u + var_i
    if var <= 0:
        return SeedCI(mean, mean, mean, 0.0, float("inf"), seed_means.tolist(), 0.0, 0.0, units)
    k = len(unit_means) if unit_means is not None else 1
    parts = (var_u ** 2 / (k - 1) if k > 1 else 0.0) + (var_i ** 2 / (n - 1) if n > 1 else 0.0)
    df = var ** 2 / parts if parts > 0 else float("inf")
    half = stats.t.ppf(0.5 + level / 2, df) * np.sqrt(var)
    return SeedCI(mean, mean - half, mean + half, float(np.sqrt(var)), float(df), seed_means.tolist(),
                  float(np.sqrt(var_u)), float(np.sqrt(var_i)), units)


# ------------------------------------------------------------------------------------------ probe fits

def subsample(labels: Labels, n: int, seed: int, fit: int) -> np.ndarray:
    """Indices of a seeded subsample of `n` training examples (all when n >= the pool), stratified by fine
    class so every class of every level keeps examples for the probe's validation split."""
    total = len(labels.fine)
    if n >= total:
        return np.arange(total)
    rng = np.random.default_rng([seed, 31, fit])
    idx = []
    classes = np.unique(labels.fine)
    for c in classes:
        members = np.flatnonzero(labels.fine == c)
        take = max(2, int(round(n * len(members) / total)))
        idx.append(rng.choice(members, min(take, len(members)), replace=False))
    return np.sort(np.concatenate(idx))


def _take(labels: Labels, idx: np.ndarray) -> Labels:
    return Labels(labels.coarse[idx], labels.fine[idx], labels.fine_to_coarse, labels.coarse_names)


def subsample_fits(train: dict[str, np.ndarray], test: dict[str, np.ndarray], ltr: Labels, lte: Labels, *,
                   pairs: Sequence[tuple[str, str, str]], n_probe: int, fits: int, seed: int,
                   levels: Sequence[str] = ("coarse", "fine"), probe: str = "auto", n_boot: int = 200,
                   desc: str = "probes") -> dict:
    """`fits` probe fits through `probes.measures.measure`, each on its own seeded subsample of `n_probe`
    training examples (same test set).

    Returns ``{"d": {suffix: [fits, N]} per-image DoL terms (coarse vs fine accuracy), "dol": [per fit: the
    measure's DoL dict], "rows": [per fit: its rows]}``; with ``detail`` in `levels` also
    ``"d_detail": {suffix: [fits, N]}`` (NaN outside groups with two fine classes).
    """
    out: dict = {"d": {p[0]: [] for p in pairs}, "d_detail": {p[0]: [] for p in pairs}, "dol": [], "rows": []}
    for r in range(fits):
        idx = subsample(ltr, n_probe, seed, r)
        rows, dol, _, fitted = measure({k: v[idx] for k, v in train.items()}, test, _take(ltr, idx), lte,
                                       list(levels), pairs=list(pairs), probe=probe, seed=seed * 1000 + r,
                                       n_boot=n_boot, mdl=False, curves=False, desc=f"{desc} fit {r + 1}/{fits}")
        for suffix, slow, fast in pairs:
            c = {k: fitted[k].correct.astype(np.float64) for k in
                 [(slow, "coarse"), (fast, "coarse"), (slow, "fine"), (fast, "fine")]}
            out["d"][suffix].append((c[slow, "coarse"] - c[fast, "coarse"]) - (c[slow, "fine"] - c[fast, "fine"]))
            if "detail" in levels:
                out["d_detail"][suffix].append(_detail_terms(rows, c, slow, fast, lte))
        out["dol"].append(dol)
        out["rows"].append(rows)
    out["d"] = {k: np.stack(v) for k, v in out["d"].items()}
    out["d_detail"] = {k: np.stack(v) for k, v in out["d_detail"].items() if v}
    return out


def _detail_terms(rows, c, slow, fast, lte: Labels) -> np.ndarray:
    """Per-image (slow - fast | coarse) - (slow - fast | detail). `measure` does not return the detail probes'
    per-image correctness, so each image's detail term is its group's detail accuracy (same mean per group)."""
    out = np.full(len(lte.fine), np.nan)
    names = list(lte.coarse_names)
    acc = {(r["path"], r["group"]): r["acc"] for r in rows if r["level"] == "detail" and r["group"]}
    for g, name in enumerate(names):
        if (slow, name) in acc and (fast, name) in acc:
            m = lte.coarse == g
            out[m] = (c[slow, "coarse"][m] - c[fast, "coarse"][m]) - (acc[slow, name] - acc[fast, name])
    return out


# ------------------------------------------------------------------------------------------ planted features

def planted_features(ltr: Labels, lte: Labels, *, theta: float, snr: float, widths: tuple[int, int],
                     model_seed: int, noise_seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Synthetic ``slow`` / ``fast`` features for the train and test labels, with a planted division of labour.

    Each path is class signal plus unit Gaussian noise per channel:
        slow = sqrt(snr) * ((1 + theta) u_slow[coarse] + (1 - theta) v_slow[fine]) + noise
        fast = sqrt(snr) * ((1 - theta) u_fast[coarse] + (1 + theta) v_fast[fine]) + noise
    where u are coarse-class directions and v within-group detail directions (each fine class's v minus its
    group's mean v, so v carries no coarse information), random unit-norm vectors drawn from `model_seed` (a
    new "model"). With equal widths the two paths have the same distribution at theta = 0, so the true DoL is
    exactly zero; as theta grows the slow path carries more of the abstraction and the fast path more of the
    detail, so the DoL grows with theta (its size in accuracy at a given N is what `power_curve` measures).
    Unequal widths are not a null: a finite-sample probe gains more from extra channels at one level than at
    the other, so the wider path gets a DoL of its own (the bias the baseline's matched split, with the Steps
    widths, controls for). `snr` is the squared norm of each signal term at theta = 0 over the noise variance
    of one channel.
    """
    if not 0 <= theta < 1:
        raise ValueError(f"theta must be in [0, 1), got {theta}")
    rng = np.random.default_rng([model_seed, 41])
    n_coarse, n_fine = len(ltr.coarse_names), len(ltr.fine_to_coarse)
    f2c = np.asarray(ltr.fine_to_coarse)

    def directions(n: int, width: int) -> np.ndarray:
        v = rng.standard_normal((n, width))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    means = {}
    for path, width, (a, b) in (("slow", widths[0], (1 + theta, 1 - theta)),
                                ("fast", widths[1], (1 - theta, 1 + theta))):
        u, v = directions(n_coarse, width), directions(n_fine, width)
        for g in range(n_coarse):  # detail only: centre each group's detail vectors
            v[f2c == g] -= v[f2c == g].mean(0)
        means[path] = np.sqrt(snr) * (a * u[f2c] + b * v)  # [n_fine, width]: class mean of each fine class
    noise = np.random.default_rng([noise_seed, 43])

    def draw(labels: Labels) -> dict[str, np.ndarray]:
        return {p: (m[labels.fine] + noise.standard_normal((len(labels.fine), m.shape[1]))).astype(np.float32)
                for p, m in means.items()}

    return draw(ltr), draw(lte)


def planted_study(ltr: Labels, lte: Labels, *, theta: float, snr: float, widths: tuple[int, int],
                  seeds: Sequence[int], fits: int, n_probe: int, rep: int = 0, probe: str = "auto") -> SeedCI:
    """One simulated study on planted features: for each seed a new "model" (class directions) and new noise,
    `fits` probe fits on subsamples of `n_probe`, the interval of `seed_ci`."""
    d = []
    for s in seeds:
        tr, te = planted_features(ltr, lte, theta=theta, snr=snr, widths=widths, model_seed=1_000_003 * rep + s,
                                  noise_seed=1_000_003 * rep + s)
        res = subsample_fits(tr, te, ltr, lte, pairs=[("", "slow", "fast")], n_probe=n_probe, fits=fits, seed=s,
                             probe=probe, n_boot=2, desc=f"planted theta={theta:.2f}")
        d.append(res["d"][""])
    return seed_ci(np.stack(d))


def calibrate_snr(ltr: Labels, lte: Labels, target_acc: float, *, widths: tuple[int, int], n_probe: int,
                  grid: Sequence[float] = tuple(np.geomspace(0.05, 50, 13))) -> float:
    """The `snr` of `grid` whose planted slow path at theta = 0 comes closest to `target_acc` fine probe
    accuracy (one fit each), so the planted features are as hard for a probe as the real ones."""
    best, gap = grid[0], np.inf
    idx = subsample(ltr, n_probe, 0, 0)
    for snr in grid:
        tr, te = planted_features(ltr, lte, theta=0.0, snr=float(snr), widths=widths, model_seed=7, noise_seed=7)
        rows, _, _, _ = measure({"slow": tr["slow"][idx]}, {"slow": te["slow"]}, _take(ltr, idx), lte, ["fine"],
                                mdl=False, curves=False, n_boot=2, desc="calibrate snr")
        if abs(rows[0]["acc"] - target_acc) < gap:
            best, gap = float(snr), abs(rows[0]["acc"] - target_acc)
    return best


@dataclass
class PowerCurve:
    """Per theta: the mean DoL (the effect at the study's N), the fraction of simulated studies whose interval
    lies above zero (power; at theta = 0 the false-positive rate), and each study's interval."""
    thetas: list[float]
    effect: list[float]
    power: list[float]
    studies: list[list[dict]] = field(default_factory=list)
    mde: float = float("nan")          # smallest effect detected with `target` power (interpolated)
    target: float = 0.8

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def power_curve(ltr: Labels, lte: Labels, *, thetas: Sequence[float], reps: int, snr: float,
                widths: tuple[int, int], seeds: Sequence[int], fits: int, n_probe: int, target: float = 0.8,
                probe: str = "auto", progress=None) -> PowerCurve:
    """`reps` simulated studies per theta (`planted_study`); the MDE is the effect at which the power, linearly
    interpolated between thetas (in increasing order of effect), first reaches `target` (NaN if it never does).
    `progress(done)` is called after each simulated study (a tqdm bar's update, say)."""
    effect, power, studies = [], [], []
    for theta in thetas:
        res = []
        for k in range(reps):
            res.append(planted_study(ltr, lte, theta=theta, snr=snr, widths=widths, seeds=seeds, fits=fits,
                                     n_probe=n_probe, rep=k, probe=probe))
            if progress is not None:
                progress(1)
        effect.append(float(np.mean([r.mean for r in res])))
        power.append(float(np.mean([r.ci_low > 0 for r in res])))
        studies.append([r.as_dict() for r in res])
    curve = PowerCurve(list(map(float, thetas)), effect, power, studies, target=target)
    curve.mde = mde_from(effect, power, target)
    return curve


def mde_from(effect: Sequence[float], power: Sequence[float], target: float = 0.8) -> float:
    """The effect where `power` (against `effect`, sorted by effect) first reaches `target`, interpolated."""
    order = np.argsort(effect)
    e, p = np.asarray(effect)[order], np.asarray(power)[order]
    for k in range(len(e)):
        if p[k] >= target:
            if k == 0 or p[k] == p[k - 1]:
                return float(e[k])
            return float(e[k - 1] + (target - p[k - 1]) * (e[k] - e[k - 1]) / (p[k] - p[k - 1]))
    return float("nan")


def analytic_mde(se: float, df: float, level: float = 0.95, power: float = 0.8) -> float:
    """(t_{1-alpha/2, df} + t_{power, df}) x se: the effect a two-sided t-test with this standard error detects
    with `power` (the normal-approximation formula with t quantiles)."""
    df = df if np.isfinite(df) else 1e9
    return float((stats.t.ppf(0.5 + level / 2, df) + stats.t.ppf(power, df)) * se)
