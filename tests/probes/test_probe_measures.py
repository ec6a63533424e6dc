"""Probes and measures on synthetic features with known answers (no model, no MLflow)."""
from __future__ import annotations

import numpy as np
import pytest

from probes.linear import fit_probe
from probes.measures import (Labels, bootstrap_ci, division_of_labour, geometric_ks, k_control, measure, metrics_of,
                             pca_k, prequential_mdl, random_k)
from experiments.probe_run import format_table

F2C = [k // 4 for k in range(8)]  # 2 coarse groups x 4 fine classes each


def synthetic(n: int, seed: int, shuffle: bool = False):
    """Coarse information only in the first ("slow") channels, fine-within-coarse only in the last ("fast")."""
    rng = np.random.default_rng(seed)
    fine = rng.integers(0, 8, n)
    coarse = np.asarray(F2C)[fine]
    slow, fast = rng.normal(size=(n, 24)), rng.normal(size=(n, 8))
    slow[:, 0] += 3.0 * (2 * coarse - 1)
    slow[:, 1] += 1.5 * (2 * coarse - 1)
    for j in range(4):
        fast[:, j] += 3.0 * (fine % 4 == j)
    if shuffle:
        perm = rng.permutation(n)
        fine, coarse = fine[perm], coarse[perm]
    feats = {"slow": slow, "fast": fast, "full": np.concatenate([slow, fast], 1)}
    return feats, Labels(coarse, fine, F2C, ["g0", "g1"])


@pytest.fixture(scope="module")
def measured():
    tr, ltr = synthetic(600, 0)
    te, lte = synthetic(400, 1)
    rows, dol, curves, fits = measure(tr, te, ltr, lte, ["coarse", "fine", "detail"], full={"slow", "fast", "full"},
                                      pairs=[("", "slow", "fast")], seed=0, n_boot=500)
    return {(r["path"], r["level"]): r for r in rows if not r["group"]}, rows, dol, curves


def test_slow_carries_coarse_fast_carries_detail(measured):
    by, _, dol, _ = measured
    assert by["slow", "coarse"]["acc"] > 0.95 and by["fast", "coarse"]["acc"] < 0.65
    assert by["fast", "fine"]["acc"] > by["slow", "fine"]["acc"] + 0.15  # the reverse on fine
    assert by["fast", "detail"]["acc"] > 0.85 and by["slow", "detail"]["acc"] < 0.4
    assert by["full", "fine"]["acc"] > 0.8
    score, lo, hi = dol["acc"]
    assert score > 0.4 and lo > 0 and lo <= score <= hi
    assert dol["mdl"][0] > 0 and dol["mdl"][1] > 0  # MDL sign: positive = the claim, too
    assert dol["acc.detail"][1] > 0
    for key in ("acc_pca", "acc_rand"):
        assert dol[key][1] > 0  # the equal-width controls keep the answer
    # The slow path's coarse labels compress far better than the fast path's.
    assert by["slow", "coarse"]["mdl_bits"] < 0.5 * by["fast", "coarse"]["mdl_bits"]


def test_metric_names_and_table(measured):
    by, rows, dol, curves = measured
    m = metrics_of(rows, dol)
    for name in ("acc.slow.coarse", "acc.slow.coarse.ci_low", "acc.fast.fine.ci_high", "bal_acc.full.fine",
                 "xent.fast.coarse", "mdl.slow.fine", "mdl_ratio.fast.coarse", "acc_pca.slow.coarse",
                 "acc_rand.fast.fine", "acc.fast.detail", "acc.fast.detail.g0", "dol.acc", "dol.acc.ci_low",
                 "dol.acc.ci_high", "dol.mdl", "dol.acc_pca", "dol.acc_rand", "dol.acc.detail"):
        assert name in m, name
    assert by["slow", "coarse"]["k_eq"] == 8  # the narrower path's width
    assert {c["k"] for c in curves if c["path"] == "slow"} == {1, 4, 16, 24}
    table = format_table(rows, dol)
    assert "slow" in table and "division of labour acc:" in table


def test_shuffled_labels_fall_to_chance():
    tr, ltr = synthetic(600, 0, shuffle=True)
    te, lte = synthetic(400, 1, shuffle=True)
    coarse = fit_probe(tr["full"], ltr.coarse, te["full"], lte.coarse, seed=0)
    fine = fit_probe(tr["full"], ltr.fine, te["full"], lte.fine, seed=0)
    assert abs(coarse.acc - 0.5) < 0.08
    assert abs(fine.acc - 1 / 8) < 0.06


def test_torch_probe_matches_sklearn():
    tr, ltr = synthetic(500, 2)
    te, lte = synthetic(300, 3)
    a = fit_probe(tr["full"], ltr.fine, te["full"], lte.fine, probe="sklearn", C=1.0)
    b = fit_probe(tr["full"], ltr.fine, te["full"], lte.fine, probe="torch", C=1.0)
    assert b.backend == "torch" and a.backend == "sklearn"
    assert abs(a.acc - b.acc) < 0.03 and abs(a.xent - b.xent) < 0.05
    assert b.coef.shape == (8, 32) and b.correct.shape == (300,)


def test_batched_and_warm_started_solves_reach_each_Cs_own_optimum():
    """One batched L-BFGS over a grid of Cs gives each C the probe a solve of its own gives, and a warm start from
    another solution changes the time, not the result (the objective is strictly convex)."""
    from probes.linear import _fit_torch, _proba

    tr, ltr = synthetic(600, 6)
    x = (tr["full"] - tr["full"].mean(0)) / tr["full"].std(0)
    x, y, grid = x.astype(np.float32), ltr.fine, (0.01, 0.1, 1.0)
    coef, icpt = _fit_torch(x, y, grid, 8)
    # Probabilities, not intercepts: adding one constant to every class's intercept changes nothing.
    for i, C in enumerate(grid):
        alone = _fit_torch(x, y, (C,), 8)
        assert np.abs(_proba(x, coef[i], icpt[i]) - _proba(x, alone[0][0], alone[1][0])).max() < 2e-3
    warm = _fit_torch(x, y, (0.1,), 8, init=(coef[2:3], icpt[2:3]))  # start from C = 1's optimum
    assert np.abs(_proba(x, warm[0][0], warm[1][0]) - _proba(x, coef[1], icpt[1])).max() < 2e-3
    assert np.abs(_proba(x, coef[0], icpt[0]) - _proba(x, coef[2], icpt[2])).max() > 0.05  # the Cs differ


def test_better_features_shorter_description_length():
    tr, ltr = synthetic(800, 4)
    noise = np.random.default_rng(5).normal(size=tr["slow"].shape)
    good = prequential_mdl(tr["slow"], ltr.coarse, 2, seed=0)
    bad = prequential_mdl(noise, ltr.coarse, 2, seed=0)
    assert good.bits < 0.4 * bad.bits
    assert bad.ratio > 0.9  # noise cannot compress the labels much below the uniform code
    assert good.uniform == pytest.approx(800.0) and good.per_example.shape == (800,)
    assert good.per_example.sum() == pytest.approx(good.bits)


def test_equal_width_controls_have_requested_dims():
    rng = np.random.default_rng(0)
    xtr, xte = rng.normal(size=(100, 20)), rng.normal(size=(40, 20))
    a, b = pca_k(xtr, xte, 5)
    assert a.shape == (100, 5) and b.shape == (40, 5)
    tok_tr, tok_te = rng.normal(size=(100, 3, 20)), rng.normal(size=(40, 3, 20))
    c, d = random_k(tok_tr, tok_te, 7, seed=1)
    assert c.shape == (100, 3, 7) and d.shape == (40, 3, 7)
    assert not np.array_equal(random_k(xtr, xte, 7, seed=1)[0], random_k(xtr, xte, 7, seed=2)[0])
    acc, correct = k_control(xtr, rng.integers(0, 2, 100), xte, rng.integers(0, 2, 40), 4, method="random", draws=3)
    assert correct.shape == (40,) and 0 <= acc <= 1
    assert geometric_ks(96, extra=(32,)) == [1, 4, 16, 32, 64, 96]
    with pytest.raises(ValueError, match="k=30"):
        pca_k(xtr, xte, 30)


def test_bootstrap_and_dol_sign():
    v = np.r_[np.ones(70), np.zeros(30)]
    mean, lo, hi = bootstrap_ci(v, seed=0)
    assert mean == pytest.approx(0.7) and lo < 0.7 < hi and hi - lo < 0.25
    ones, zeros = np.ones(50), np.zeros(50)
    assert division_of_labour(ones, zeros, zeros, ones)[0] == 2.0   # the claim, fully
    assert division_of_labour(zeros, ones, ones, zeros)[0] == -2.0  # the opposite


def test_bootstrap_in_blocks_draws_what_one_array_drew():
    """bootstrap_ci draws its resamples in blocks of 50: the same resamples as one [n_boot, N] array."""
    values = np.random.default_rng(3).random(5000)
    idx = np.random.default_rng([0, 19]).integers(0, len(values), (1000, len(values)))  # the old, one-array way
    means = values[idx].mean(1)
    assert bootstrap_ci(values) == (values.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5))


def test_jobs_side_by_side_give_the_numbers_of_one_after_another():
    """`measure` runs its (path, level) jobs in parallel threads when torch has more than one: the same rows,
    scores and curves, in the same order, as the jobs run one by one on one thread."""
    import torch

    tr, ltr = synthetic(300, 0)
    te, lte = synthetic(200, 1)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):  # one thread: one job at a time; two: two jobs at once, each on one thread
            torch.set_num_threads(n)
            runs.append(measure(tr, te, ltr, lte, ["coarse", "fine"], full={"slow", "fast"},
                                pairs=[("", "slow", "fast")], seed=0, n_boot=200))
    finally:
        torch.set_num_threads(threads)
    (rows1, dol1, curves1, fits1), (rows2, dol2, curves2, fits2) = runs
    assert rows1 == rows2 and dol1 == dol2 and curves1 == curves2
    assert list(fits1) == list(fits2) == [(p, lv) for p in ("slow", "fast", "full") for lv in ("coarse", "fine")]
    for key in fits1:
        np.testing.assert_array_equal(fits1[key].coef, fits2[key].coef)
