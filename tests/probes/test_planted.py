"""probes.planted: the seed-level interval covers what it claims, planted features carry the division of labour
they were built with (none at theta = 0), the power curve and the MDE behave."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from probes.measures import Labels
from probes.planted import (analytic_mde, mde_from, planted_features, planted_study, power_curve, seed_ci,
                            subsample, subsample_fits)

F2C = [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]  # Fashion-MNIST's hierarchy


def labels(n: int, seed: int) -> Labels:
    fine = np.random.default_rng(seed).permutation(np.arange(n) % 10)
    return Labels(np.asarray(F2C)[fine], fine, F2C, ["tops", "bottoms", "footwear", "bag"])


def test_seed_ci_is_the_t_interval_of_seed_means_when_images_agree():
    # Every image of a seed has the seed's value: no image variance, so the interval is t_{S-1} on seed means.
    means = np.array([0.1, 0.3, 0.2])
    d = np.broadcast_to(means[:, None, None], (3, 2, 50)).copy()
    ci = seed_ci(d)
    half = stats.t.ppf(0.975, 2) * means.std(ddof=1) / np.sqrt(3)
    assert ci.units == "seeds" and ci.df == pytest.approx(2)
    assert (ci.ci_low, ci.ci_high) == pytest.approx((0.2 - half, 0.2 + half))


def test_seed_ci_adds_the_image_variance_the_seeds_cannot_see():
    # Identical seeds (same images, same values): the seeds' spread is zero, the images' is not.
    rng = np.random.default_rng(0)
    per_image = rng.normal(0.0, 1.0, 400)
    d = np.broadcast_to(per_image, (3, 2, 400)).copy()
    ci = seed_ci(d)
    assert ci.se_units == 0 and ci.se_images == pytest.approx(per_image.std(ddof=1) / 20)
    assert ci.ci_low < per_image.mean() < ci.ci_high


def test_seed_ci_covers_the_truth_about_95_percent_of_the_time():
    # Seeds differ by a random offset (sd 0.05), images by noise shared across seeds: true mean 0.
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(400):
        shared = rng.normal(0, 0.5, 200)
        d = shared + rng.normal(0, 0.05, (3, 1, 1)) + rng.normal(0, 0.3, (3, 2, 200))
        ci = seed_ci(d)
        hits += ci.ci_low <= 0 <= ci.ci_high
    assert 0.9 <= hits / 400 <= 0.995


def test_seed_ci_falls_back_to_fits_and_ignores_unscored_images():
    d = np.array([[[1.0, np.nan, 0.0], [0.0, np.nan, 1.0]]])
    ci = seed_ci(d)
    assert ci.units == "fits" and ci.mean == pytest.approx(0.5)
    with pytest.raises(ValueError, match="seeds, fits, images"):
        seed_ci(np.zeros((3, 4)))


def test_subsample_is_seeded_stratified_and_differs_between_fits():
    lab = labels(1000, 0)
    a, b, again = subsample(lab, 200, 3, 0), subsample(lab, 200, 3, 1), subsample(lab, 200, 3, 0)
    assert np.array_equal(a, again) and not np.array_equal(a, b)
    assert abs(len(a) - 200) <= 10 and set(np.bincount(lab.fine[a])) <= set(range(18, 23))
    assert np.array_equal(subsample(lab, 5000, 0, 0), np.arange(1000))


def test_planted_features_have_no_division_of_labour_at_theta_zero_and_one_above_it():
    # Equal widths: at theta = 0 the paths are exchangeable (unequal widths carry a width bias of their own).
    ltr, lte = labels(1200, 0), labels(1200, 1)

    def dol(theta: float) -> float:
        tr, te = planted_features(ltr, lte, theta=theta, snr=4.0, widths=(16, 16), model_seed=0, noise_seed=0)
        res = subsample_fits(tr, te, ltr, lte, pairs=[("", "slow", "fast")], n_probe=800, fits=1, seed=0,
                             n_boot=2)
        return float(res["d"][""].mean())

    null, planted = dol(0.0), dol(0.6)
    assert abs(null) < 0.06
    assert planted > 0.15 and planted > null + 0.1


def test_planted_features_are_reproducible_and_reject_bad_theta():
    ltr, lte = labels(100, 0), labels(100, 1)
    a = planted_features(ltr, lte, theta=0.2, snr=1.0, widths=(8, 4), model_seed=1, noise_seed=2)
    b = planted_features(ltr, lte, theta=0.2, snr=1.0, widths=(8, 4), model_seed=1, noise_seed=2)
    assert np.array_equal(a[1]["slow"], b[1]["slow"]) and a[0]["fast"].shape == (100, 4)
    with pytest.raises(ValueError, match="theta"):
        planted_features(ltr, lte, theta=1.0, snr=1.0, widths=(8, 4), model_seed=1, noise_seed=2)


def test_power_curve_rises_with_the_planted_effect():
    ltr, lte = labels(600, 0), labels(600, 1)
    curve = power_curve(ltr, lte, thetas=(0.0, 0.5), reps=2, snr=4.0, widths=(8, 8), seeds=(0, 1, 2), fits=1,
                        n_probe=400)
    assert curve.power[0] == 0.0 and curve.power[1] == 1.0
    assert curve.effect[1] > curve.effect[0] + 0.1
    assert curve.effect[0] < curve.mde <= curve.effect[1]
    study = planted_study(ltr, lte, theta=0.5, snr=4.0, widths=(8, 8), seeds=(0, 1), fits=1, n_probe=400)
    assert study.ci_low > 0 and len(study.seed_means) == 2


def test_mde_interpolates_and_is_nan_when_power_never_reaches_the_target():
    assert mde_from([0.0, 0.1, 0.2], [0.0, 0.6, 1.0]) == pytest.approx(0.1 + 0.2 / 0.4 * 0.1)
    assert mde_from([0.2, 0.0], [0.9, 0.1]) == pytest.approx(0.0 + 0.7 / 0.8 * 0.2)
    assert np.isnan(mde_from([0.0, 0.1], [0.0, 0.5]))
    # Large df: the normal formula (1.96 + 0.84) x se.
    assert analytic_mde(0.01, float("inf")) == pytest.approx(0.028, abs=2e-4)
    assert analytic_mde(0.01, 2) > analytic_mde(0.01, 20)
