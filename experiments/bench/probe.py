"""probe: `probes.linear.fit_probe` at one C, scikit-learn vs torch, on synthetic features with a known linear
signal (`--probe-n` x `--probe-d`)."""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from experiments.bench.harness import Setup, log, optional, sync


def synthetic_features(n: int, d: int, k: int, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Gaussian features with per-feature scales, labels = argmax(X W + Gumbel noise): a known linear signal.

    Returns train features and labels, test features and labels, and the generating map's test accuracy."""
    rng = np.random.default_rng(seed)
    n_test = max(k * 10, n // 5)
    x = rng.standard_normal((n + n_test, d), dtype=np.float32)
    x *= rng.uniform(0.5, 2.0, size=d).astype(np.float32)
    w = (rng.standard_normal((d, k)) * 6.0 / math.sqrt(d)).astype(np.float32)
    clean = x @ w
    y = (clean + rng.gumbel(size=clean.shape).astype(np.float32)).argmax(1)
    oracle = float((clean[n:].argmax(1) == y[n:]).mean())
    return x[:n], y[:n], x[n:], y[n:], oracle


def run(n: int, d: int, k: int, setup: Setup, notes: list[str]) -> dict | None:
    """Fit time and test accuracy of both backends on n x d features, k classes; None (noted) without sklearn."""
    if optional("sklearn.linear_model", "probe", notes) is None:
        return None
    from probes.linear import fit_probe

    xtr, ytr, xte, yte, oracle = synthetic_features(n, d, k)
    res: dict[str, Any] = {"n": n, "d": d, "classes": k, "test": len(yte), "oracle_acc": oracle, "C": 1.0,
                           "note": "one fit at C=1 each (fit_probe's C selection would fit 5 times)"}
    for backend in ("sklearn", "torch"):
        log(f"probe: {backend} on {n} x {d}")
        sync(setup.device)
        t0 = time.perf_counter()
        fit = fit_probe(xtr, ytr, xte, yte, probe=backend, C=1.0, seed=0)
        sync(setup.device)
        res[backend] = {"fit_s": time.perf_counter() - t0, "acc": fit.acc}
        log(f"probe: {backend} {res[backend]['fit_s']:.1f} s, acc {fit.acc:.4f}")
    res["acc_gap"] = abs(res["sklearn"]["acc"] - res["torch"]["acc"])
    res["faster"] = min(("sklearn", "torch"), key=lambda b: res[b]["fit_s"])
    return res
