"""probes.linear's one solver: preconditioned L-BFGS run to convergence, warm-started along the C path and from
earlier solutions. Warm starts and path order change the time, never the probe (up to the tolerance)."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from probes.features import extract
from probes.linear import Standardiser, _fit_torch, _proba, fit_proba_grid, fit_probe
from probes.measures import prequential_mdl


def _ill_conditioned(n: int = 800, seed: int = 0):
    """6 classes in 24 standardised dims, three of them near copies of others (condition number ~1e8), like
    the pooled LayerNorm outputs of the demo model."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, n)
    x = rng.normal(size=(n, 24)) + 0.8 * np.eye(6, 24)[y] * 3
    x[:, 21:] = x[:, :3] + 1e-4 * rng.normal(size=(n, 3))
    return Standardiser.fit(x)(x).astype(np.float32), y


def _close(a, b, tol=2e-3):
    return np.abs(_proba(XS, *a) - _proba(XS, *b)).max() < tol


XS, YS = _ill_conditioned()


def test_converges_to_sklearns_optimum_on_ill_conditioned_features():
    """The optimum of sklearn's objective, which sklearn's own lbfgs reaches only with many iterations."""
    for C in (0.1, 10.0):
        coef, icpt = _fit_torch(XS, YS, (C,), 6)
        ref = LogisticRegression(C=C, max_iter=20_000, tol=1e-10).fit(XS.astype(np.float64), YS)
        assert np.abs(_proba(XS, coef[0], icpt[0]) - ref.predict_proba(XS)).max() < 5e-3, C


def test_the_C_path_gives_each_Cs_own_probe():
    grid = (10.0, 0.01, 1.0)  # any order: the path runs from the strongest regularisation up
    coef, icpt = _fit_torch(XS, YS, grid, 6)
    for i, C in enumerate(grid):
        alone = _fit_torch(XS, YS, (C,), 6)
        assert _close((coef[i], icpt[i]), (alone[0][0], alone[1][0])), C


def test_a_warm_start_from_anywhere_reaches_the_same_probe():
    cold = _fit_torch(XS, YS, (1.0,), 6)
    other = _fit_torch(XS[:200], YS[:200], (0.01,), 6)  # another C on other data: far from this optimum
    warm = _fit_torch(XS, YS, (1.0,), 6, init=other)
    assert _close((warm[0][0], warm[1][0]), (cold[0][0], cold[1][0]))


def test_same_call_same_numbers():
    a, b = fit_probe(XS[:600], YS[:600], XS[600:], YS[600:]), fit_probe(XS[:600], YS[:600], XS[600:], YS[600:])
    assert a.backend == "torch" and a.C == b.C
    np.testing.assert_array_equal(a.coef, b.coef)
    np.testing.assert_array_equal(a.correct, b.correct)
    m1, m2 = prequential_mdl(XS, YS, 6, seed=1), prequential_mdl(XS, YS, 6, seed=1)
    assert m1.bits == m2.bits


def test_mdl_blocks_warm_started_from_the_previous_block_give_the_cold_code_lengths():
    """What `prequential_mdl` does (each block from the previous block's solution) against cold solves: the
    block's code length agrees to 0.1% (single probabilities to 1e-2: the solver's tolerance at C = 10 on
    400 nearly separable examples, where the optimum is flat)."""
    x, y, yb = XS[:400], YS[:400], YS[400:]
    _, prev = fit_proba_grid(x[:200], y[:200], x[:1], 6, Cs=(0.1, 10.0))
    warm, _ = fit_proba_grid(x, y, XS[400:], 6, Cs=(0.1, 10.0), init=prev)
    cold, _ = fit_proba_grid(x, y, XS[400:], 6, Cs=(0.1, 10.0))
    for w, c in zip(warm, cold):
        bits_w, bits_c = (-np.log2(p[np.arange(len(yb)), yb]).sum() for p in (w, c))
        assert abs(bits_w - bits_c) / bits_c < 1e-3
        assert np.abs(w - c).max() < 1e-2


def test_extraction_in_inference_mode_is_the_no_grad_forward():
    import models
    from experiments.data import load_dataset
    from models.sites import forward_paths

    torch.manual_seed(0)
    model = models.create_model("steps_deit_micro", num_classes=16).eval()
    ds = load_dataset("hierarchy", "test", limit=40, seed=0, n=64)
    out = extract(model, ds, ["final", "slow_path"], batch_size=16, cache=False)  # 16 + 16 + a short 8
    with torch.no_grad():
        ref = forward_paths(model, ds.normalise(ds.images), ["final"])["final"][:, 1:].mean(1).numpy()
    assert out["final"].dtype == np.float32 and out["final"].shape == (40, 128)
    np.testing.assert_allclose(out["final"], ref, atol=1e-5)
    np.testing.assert_array_equal(out["slow_path"], out["final"][:, :96])


def test_the_hand_written_gradient_is_autograds_summed_over_parts():
    """`_xent_grad` (class-major logits, summed part by part) against autograd's mean cross-entropy."""
    from probes.linear import _xent_grad

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 24, generator=g), torch.randint(0, 6, (300,), generator=g)
    w, b = torch.randn(24, 6, generator=g, requires_grad=True), torch.randn(6, generator=g, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(x @ w + b, y)
    loss.backward()
    parts = lambda: iter([(x[:100], y[:100]), (x[100:], y[100:])])  # noqa: E731
    mine, gw, gb = _xent_grad(parts, 300, torch.device("cpu"))(w.detach(), b.detach())
    torch.testing.assert_close(mine, loss.detach())
    torch.testing.assert_close(gw, w.grad)
    torch.testing.assert_close(gb, b.grad)


def test_parallel_fits_share_out_the_threads_and_restore_them():
    from probes.linear import parallel_fits

    threads = torch.get_num_threads()
    cpu = not torch.cuda.is_available()
    try:
        for n, jobs, want in ((2, 6, (2, 1)), (8, 6, (4, 2)), (8, 3, (3, 2)), (2, 1, (1, 2))):
            torch.set_num_threads(n)
            with parallel_fits(jobs) as workers:  # at most 4 at once; one job: nothing changed
                assert (workers, torch.get_num_threads()) == (want if cpu else (1, n)), (n, jobs)
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
