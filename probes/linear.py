"""Linear probes: standardise, then multinomial logistic regression, C chosen on a seeded validation split.

`fit_probe` picks C from `CS` by validation cross-entropy on a stratified 20% of train (seeded), refits on all of
train, and scores the test split (top-1, balanced accuracy, cross-entropy, per-image correctness).

Two backends fit the same model (L2-regularised multinomial logistic regression on standardised features,
objective ``C * sum(cross-entropy) + ||W||^2 / 2`` as scikit-learn's):
    torch     (``auto``, every size) `_solve`: full-batch L-BFGS run to convergence in preconditioned coordinates,
              on the GPU when there is one; loss and gradient by hand, one thread for small problems
    sklearn   `sklearn.linear_model.LogisticRegression` (lbfgs, at most 100 iterations): a cross-check
Converged, not capped. The demo model's pooled features are badly conditioned (condition numbers 1e5 to 1e14),
so capped solvers stopped far from the optimum at large C, and the numbers were those of the cap (slow path,
fine labels, C = 10, 60k images: sklearn's test accuracy 0.707 / 0.734 / 0.762 after 100 / 300 / 1000
iterations; the torch solver's 300 gave 0.739, the optimum is 0.764). The preconditioner (`_solve`) evens out
the curvature so a converged solve takes ~100 iterations, and since the problem is strictly convex the result
is the optimum whatever the start: every C of a grid starts from the previous C's solution, the refit on all
of train from the chosen C's solution on the training part, and each online-MDL block from the previous
block's (`fit_proba_grid`'s ``init``). These change the time, not the probe (tests/probes/test_linear_solver.py).

Features may be ``[N, C]`` or ``[N, T, C]`` (token features); the probe sees them flattened to ``[N, T*C]``.
Cross-entropy is reported in nats per test image.

Out of core: `fit_probe_streamed` and `fit_proba_grid_streamed` take features that need not fit in memory (a
`probes.shards.ShardedArray`, or anything with ``chunks()`` and ``shape``) and fit the torch backend's probe: the
standardiser from streamed sums, then the same `_solve` (the same starts and tolerance) on the exact full-batch
loss, gradient and covariance, accumulated chunk by chunk over the memory-mapped shards: the in-memory
``probe="torch"`` fit up to float rounding and the solver's tolerance.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from models.errors import UserError
from probes.choices import PROBES
from probes.runtime import blas_controller, side_by_side

__all__ = ["PROBES", "CS", "ProbeFit", "Standardiser", "fit_probe", "fit_proba", "fit_proba_grid",
           "fit_probe_streamed", "fit_proba_grid_streamed", "stream_standardiser", "choose_backend", "flat",
           "small_blas", "parallel_fits"]

CS = (0.01, 0.1, 1.0, 10.0)  # regularisation grid; features are standardised so one grid fits all
# Convergence: max |gradient| of the mean objective in the preconditioned coordinates (where the curvature is
# about even, so this bounds the distance to the optimum). At 1e-5 warm and cold starts agree on code lengths
# to 0.02% and probabilities to 2e-3; at 3e-5 only to 0.3% (tests/probes/test_linear_solver.py); below it,
# float32 rounding.
_TOL = 1e-5
_MAX_ITER = 1000  # a safety net only: solves stop on _TOL, or when the float32 loss stops changing
_PRECOND = 8.0  # the preconditioner's ridge in units of the penalty weight reg (see `_solve`)
_EPS = 1e-12
_SMALL = 2_000_000  # feature values below which a fit runs on one BLAS thread
_ONE_THREAD_WORK = 1_000_000_000  # multiply-adds of one loss GEMM below which a torch fit runs on one thread


def small_blas(n_values: int) -> contextlib.AbstractContextManager:
    """One BLAS thread for small problems: on a busy CPU, and next to torch's own thread pool, threads on tiny
    matrices cost far more than they give (a 320 x 128 SVD took 2.4 s instead of 5 ms on 2 shared cores)."""
    return blas_controller().limit(limits=1) if n_values < _SMALL else contextlib.nullcontext()


@contextlib.contextmanager
def _small_torch(n_values: int, n_classes: int):
    """The same for torch's CPU thread pool, by the work of one GEMM of the loss (`n_values` x classes
    multiply-adds): an L-BFGS step is a chain of ops on skinny matrices, which two threads split badly (2 CPU
    cores, one evaluation: 60000 x 384 features, 10 classes, 28 ms on one thread and 40 ms on two; 60000 x 768,
    100 classes, 232 ms and 153 ms). The thread count is the process's: only the main thread changes it (fits
    side by side in worker threads run on what `parallel_fits` gave them)."""
    threads = torch.get_num_threads()
    if (threads == 1 or n_values * n_classes >= _ONE_THREAD_WORK or torch.cuda.is_available()
            or threading.current_thread() is not threading.main_thread()):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def parallel_fits(n_jobs: int) -> contextlib.AbstractContextManager[int]:
    """`probes.runtime.side_by_side` for probe fits (where `_fit_torch` runs them): how many independent fits
    to run at once from Python threads (on 2 cores: two, each on one thread, its fastest); 1 on the GPU."""
    return side_by_side(n_jobs, "cuda" if torch.cuda.is_available() else "cpu")


def flat(x: np.ndarray) -> np.ndarray:
    """[N, ...] -> [N, D] float32."""
    return np.asarray(x, dtype=np.float32).reshape(len(x), -1)


@dataclass
class Standardiser:
    """Per-feature mean and std from training data (constant features keep std 1)."""
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardiser":
        mean, std = x.mean(0), x.std(0)
        return cls(mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


@dataclass
class ProbeFit:
    """A fitted probe and its test scores. `correct` is per test image (for bootstrap CIs)."""
    acc: float
    bal_acc: float
    xent: float
    C: float
    backend: str
    classes: np.ndarray
    pred: np.ndarray
    correct: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    standardiser: Standardiser = field(repr=False)


def choose_backend(probe: str) -> str:
    """Resolve ``auto`` (torch, the converged solver, at every size: as fast as sklearn on small problems, and it
    converges) and check the name."""
    if probe not in PROBES:
        raise UserError(f"unknown probe {probe!r}; allowed: {', '.join(PROBES)}")
    return "torch" if probe == "auto" else probe


def _fit_sklearn(x: np.ndarray, y: np.ndarray, C: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    clf = LogisticRegression(C=C, max_iter=100, random_state=seed)
    with warnings.catch_warnings(), small_blas(x.size):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe at max_iter is still a fine probe
        clf.fit(x, y)
    coef, icpt = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # sklearn stores a binary problem as one row: logit(class 1) - logit(class 0)
        coef, icpt = np.concatenate([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
    return coef.astype(np.float32), icpt.astype(np.float32)


def _solve(grad: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
           cov: np.ndarray, n: int, Cs: tuple[float, ...], n_classes: int, dev: torch.device,
           init: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The one solver: for each C of `Cs`, minimise ``mean cross-entropy + ||W||^2 / (2 C n)`` (sklearn's
    objective divided by C n) by L-BFGS in preconditioned coordinates ``W = V diag(s) U``, to convergence.

    `grad(W [D, K], b [K])` gives the data term: mean cross-entropy and its gradients. `cov` is the features'
    covariance (of the standardised features), eigenvectors V, eigenvalues lam; ``s = 1 / sqrt(lam + 8 reg)``
    makes the Hessian's curvature about even in every direction (data curvature <= lam / 4 where predictions
    are uncertain, the penalty's 2 reg), so L-BFGS needs tens of iterations where the raw features (condition
    numbers 1e5 to 1e14 on the demo model's pooled LayerNorm output) needed thousands. A change of coordinates
    changes the path, not the optimum: the problem is strictly convex.

    Cs are solved from the strongest regularisation up, each from the previous C's solution (warm start along
    the path), or each from its row of `init` (coef ``[m, K, D]``, intercept ``[m, K]``: the online MDL's previous
    block). Returns coef ``[m, K, D]``, intercept ``[m, K]`` and the iterations each C took.
    """
    d = cov.shape[0]
    with small_blas(d * d):
        lam, vec = np.linalg.eigh(np.asarray(cov, np.float64))
    lam = np.clip(lam, 0.0, None)
    V = torch.as_tensor(vec, dtype=torch.float32, device=dev)
    w, b = torch.zeros(d, n_classes, device=dev), torch.zeros(n_classes, device=dev)
    coef, icpt, iters = np.zeros((len(Cs), n_classes, d), np.float32), np.zeros((len(Cs), n_classes), np.float32), \
        [0] * len(Cs)
    for i in sorted(range(len(Cs)), key=lambda j: Cs[j]):
        if init is not None:
            w, b = (torch.as_tensor(init[0][i], device=dev).T.float(), torch.as_tensor(init[1][i], device=dev).float())
        reg = 1.0 / (2 * Cs[i] * n)
        s = torch.as_tensor(1.0 / np.sqrt(lam + _PRECOND * reg), dtype=torch.float32, device=dev)
        P = V * s  # W = P U
        u, b = ((V.T @ w) / s[:, None]).contiguous(), b.clone()
        opt = torch.optim.LBFGS([u, b], lr=1, max_iter=_MAX_ITER, history_size=10, line_search_fn="strong_wolfe",
                                tolerance_grad=_TOL, tolerance_change=1e-10)

        @torch.no_grad()
        def closure():
            w_ = P @ u
            loss, gw, gb = grad(w_, b)
            u.grad, b.grad = P.T @ (gw + 2 * reg * w_), gb
            return loss + reg * (w_ * w_).sum()

        opt.step(closure)
        iters[i] = opt.state[opt._params[0]]["n_iter"]
        w = P @ u
        coef[i], icpt[i] = w.T.cpu().numpy(), b.cpu().numpy()
    return coef, icpt, iters


def _xent_grad(parts: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]], n: int, dev: torch.device
               ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The data term over (standardised features ``[n, D]``, encoded labels) parts, summed part by part: mean
    cross-entropy and its gradients in W ``[D, K]`` and b ``[K]``, by hand (two matmuls and a softmax; autograd
    costs twice).

    Class-major: logits and probabilities are ``[K, n]``, so both GEMMs have the long axis as their output's
    and the softmax reduces over the leading axis. On 2 CPU cores this took a 48000 x 96, 10-class evaluation
    from 15 ms to 5 ms on one thread (``x @ W`` with an output ``[n, 10]`` and ``x.T @ p`` are the slow
    orientations of a skinny GEMM; the softmax over 10 contiguous values a row vectorises badly).
    """
    def grad(w: torch.Tensor, b: torch.Tensor):
        loss, gw, gb = torch.zeros((), device=dev), torch.zeros_like(w.T), torch.zeros_like(b)
        for x, y in parts():
            z = torch.addmm(b[:, None], w.T, x.T)  # [K, n]
            # Softmax by hand: torch's log_softmax took 3x as long as these ops.
            top = z.amax(0, keepdim=True)
            p = (z - top).exp_()
            total = p.sum(0, keepdim=True)
            loss += (total.log() + top - z.gather(0, y[None])).sum()  # per column first: no cancellation
            p /= total
            p[y, torch.arange(len(y), device=dev)] -= 1  # now d(cross-entropy)/d(logits)
            gw += p @ x
            gb += p.sum(1)
        return loss / n, gw.T / n, gb / n
    return grad


def _fit_torch(x: np.ndarray, y: np.ndarray, Cs: tuple[float, ...], n_classes: int,
               init: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`_solve` on in-memory standardised features `x` ``[N, D]`` and encoded labels `y`, on the GPU when there is
    one (one thread for small problems on the CPU). Returns coef ``[m, K, D]`` and intercept ``[m, K]``. No seed:
    every solve starts from zero (or `init`) and converges, so there is nothing left to seed."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = len(y)
    xt = torch.as_tensor(np.ascontiguousarray(x, np.float32), device=dev)
    yt = torch.as_tensor(np.asarray(y), device=dev).long()
    with _small_torch(x.size, n_classes):
        cov = (xt.T @ xt).double().cpu().numpy() / n
        coef, icpt, _ = _solve(_xent_grad(lambda: iter([(xt, yt)]), n, dev), cov, n, Cs, n_classes, dev, init)
    return coef, icpt


def _fit(x: np.ndarray, y: np.ndarray, Cs: tuple[float, ...], backend: str, n_classes: int, seed: int,
         init: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Probes for every C of `Cs` on the same data: coef ``[m, K, D]``, intercept ``[m, K]`` (torch: converged,
    warm-started along the C path or from `init`; sklearn: each C its own capped solve, `init` unused)."""
    if backend == "torch":
        return _fit_torch(x, y, Cs, n_classes, init)
    fits = [_fit_sklearn(x, y, C, seed) for C in Cs]
    return np.stack([f[0] for f in fits]), np.stack([f[1] for f in fits])


def _proba(x: np.ndarray, coef: np.ndarray, icpt: np.ndarray) -> np.ndarray:
    logits = x @ coef.T + icpt
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def _encode(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Labels -> column index in `classes`; -1 for a label the probe never saw."""
    pos = np.searchsorted(classes, y).clip(0, len(classes) - 1)
    return np.where(classes[pos] == y, pos, -1)


def fit_proba(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, n_classes: int, *, C: float = 1.0,
              probe: str = "auto", seed: int = 0) -> np.ndarray:
    """Fit on (x_train, y_train), return probabilities ``[n_eval, n_classes]`` over labels 0..n_classes-1.

    Classes absent from y_train get probability 0 (callers that code lengths smooth it); a single class
    gives a certain prediction.
    """
    return fit_proba_grid(x_train, y_train, x_eval, n_classes, Cs=(C,), probe=probe, seed=seed)[0][0]


def fit_proba_grid(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, n_classes: int, *,
                   Cs: tuple[float, ...] = CS, probe: str = "auto", seed: int = 0,
                   init: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """`fit_proba` for every C of `Cs` in one batched fit: (probabilities per C, the solution over all
    `n_classes`, to warm-start the next call with `init`; rows of classes absent from y_train are zero).

    Online MDL fits growing prefixes of the same data: each block starts from the previous block's solution.
    """
    xtr, xev = flat(x_train), flat(x_eval)
    classes = np.unique(y_train)
    if len(classes) == 1:
        out = np.zeros((len(xev), n_classes), np.float64)
        out[:, classes[0]] = 1.0
        return [out] * len(Cs), init
    st = Standardiser.fit(xtr)
    start = None if init is None else (init[0][:, classes], init[1][:, classes])
    coef, icpt = _fit(st(xtr), _encode(y_train, classes), tuple(Cs), choose_backend(probe),
                      len(classes), seed, start)
    probas = []
    for c in range(len(Cs)):
        out = np.zeros((len(xev), n_classes), np.float64)
        out[:, classes] = _proba(st(xev), coef[c], icpt[c])
        probas.append(out)
    full_coef = np.zeros((len(Cs), n_classes, coef.shape[2]), np.float32)
    full_icpt = np.zeros((len(Cs), n_classes), np.float32)
    full_coef[:, classes], full_icpt[:, classes] = coef, icpt
    return probas, (full_coef, full_icpt)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
              probe: str = "auto", C: float | None = None, Cs: tuple[float, ...] = CS, val_frac: float = 0.2,
              seed: int = 0) -> ProbeFit:
    """Standardise, pick C on a seeded validation split of train (unless `C` is given), refit on all of train.

    Returns test top-1 accuracy, balanced accuracy, cross-entropy (nats) and per-image correctness.
    """
    xtr, xte = flat(x_train), flat(x_test)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if len(xtr) != len(y_train) or len(xte) != len(y_test):
        raise ValueError(f"features and labels differ in length: {len(xtr)}/{len(y_train)}, {len(xte)}/{len(y_test)}")
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise UserError(f"probe needs at least 2 classes in the training labels, got {classes.tolist()}")
    backend = choose_backend(probe)
    ytr = _encode(y_train, classes)
    start = None
    if C is None:  # the refit starts from the chosen C's solution on the training part: a few iterations
        C, start = _select_C(xtr, ytr, len(classes), backend, Cs, val_frac, seed)
    st = Standardiser.fit(xtr)
    coef, icpt = _fit(st(xtr), ytr, (C,), backend, len(classes), seed, start)
    coef, icpt = coef[0], icpt[0]
    proba = _proba(st(xte), coef, icpt)
    pred = classes[proba.argmax(1)]
    yte = _encode(y_test, classes)
    p_true = np.where(yte >= 0, proba[np.arange(len(yte)), yte.clip(0)], 0.0)
    correct = pred == y_test
    return ProbeFit(acc=float(correct.mean()), bal_acc=float(balanced_accuracy_score(y_test, pred)),
                    xent=float(-np.log(np.maximum(p_true, _EPS)).mean()), C=float(C), backend=backend,
                    classes=classes, pred=pred, correct=correct, coef=coef, intercept=icpt, standardiser=st)


def _select_C(x: np.ndarray, y: np.ndarray, n_classes: int, backend: str, Cs: tuple[float, ...],
              val_frac: float, seed: int) -> tuple[float, tuple[np.ndarray, np.ndarray] | None]:
    """The C with the lowest validation cross-entropy on a seeded, stratified hold-out of train, and its
    solution there.

    Cross-entropy rather than accuracy: accuracy ties on easy features and would pick an over-regularised,
    under-confident probe, which inflates the cross-entropy and MDL that reuse this C.
    """
    if len(Cs) == 1:
        return float(Cs[0]), None
    rng = np.random.default_rng([seed, 11])
    val = np.zeros(len(y), bool)
    for c in range(n_classes):  # stratified: every class keeps training examples
        idx = rng.permutation(np.flatnonzero(y == c))
        val[idx[:int(len(idx) * val_frac)]] = True
    if not val.any() or val.all():
        return 1.0, None
    st = Standardiser.fit(x[~val])
    xa, xv = st(x[~val]), st(x[val])
    coef, icpt = _fit(xa, y[~val], tuple(Cs), backend, n_classes, seed)
    scores = [-np.log(np.maximum(_proba(xv, coef[i], icpt[i])[np.arange(val.sum()), y[val]], _EPS)).mean()
              for i in range(len(Cs))]
    best = int(np.argmin(scores))
    return float(Cs[best]), (coef[best:best + 1], icpt[best:best + 1])


# ------------------------------------------------------------------------------------------- out of core

def _passes(x) -> Callable[[], Iterator[np.ndarray]]:
    """A function giving a fresh pass over `x`'s rows in order, chunk by chunk (one chunk for an array)."""
    return x.chunks if hasattr(x, "chunks") else (lambda: iter([x]))


def _rows(x, mask: np.ndarray | None) -> Iterator[np.ndarray]:
    """The rows of `x` where `mask` (over all rows) is True, flattened to float32, one chunk at a time."""
    off = 0
    for c in _passes(x)():
        k = len(c)
        c = flat(c)
        yield c if mask is None else c[mask[off:off + k]]
        off += k


def stream_standardiser(x, mask: np.ndarray | None = None) -> Standardiser:
    """`Standardiser.fit` on the rows of streamed `x` selected by `mask` (all when None), from float64 sums:
    one pass, nothing held but two vectors."""
    n, s, ss = 0, 0.0, 0.0
    for c in _rows(x, mask):
        c64 = c.astype(np.float64)
        n, s, ss = n + len(c), s + c64.sum(0), ss + (c64 * c64).sum(0)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    return Standardiser(mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32))


_GATHER_BYTES = 256 << 20  # selected rows below this are gathered once instead of re-read on every L-BFGS step


def _compact(x, mask: np.ndarray | None):
    """(x, mask), or the selected rows gathered into one array when they are small: the online MDL's early
    prefixes are a few rows of the shards, and re-reading every shard per solver step to find them is waste."""
    n_rows = len(x) if mask is None else int(mask.sum())
    if not hasattr(x, "chunks") or n_rows * int(np.prod(x.shape[1:])) * 4 > _GATHER_BYTES:
        return x, mask
    parts = list(_rows(x, mask))
    return (np.concatenate(parts) if parts else np.empty((0, int(np.prod(x.shape[1:]))), np.float32)), None


def _fit_stream(x, mask: np.ndarray | None, st: Standardiser, y: np.ndarray, Cs: tuple[float, ...],
                n_classes: int, init: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """`_fit_torch` on the selected rows of `x` (standardised by `st`), the same `_solve` with the loss, gradient
    and covariance summed chunk by chunk; `y` holds the encoded labels of the selected rows in order."""
    x, mask = _compact(x, mask)
    n, d, dev = len(y), int(np.prod(x.shape[1:])), torch.device("cpu")
    yt = torch.as_tensor(np.asarray(y)).long()

    def parts() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        off = 0
        for c in _rows(x, mask):
            yield torch.as_tensor(st(c)), yt[off:off + len(c)]
            off += len(c)

    cov = np.zeros((d, d))
    for xc, _ in parts():
        cov += (xc.T @ xc).double().numpy()
    coef, icpt, _ = _solve(_xent_grad(parts, n, dev), cov / n, n, Cs, n_classes, dev, init)
    return coef, icpt


def _stream_proba(x, mask: np.ndarray | None, st: Standardiser, coef: np.ndarray, icpt: np.ndarray
                  ) -> np.ndarray:
    """Probabilities [n_selected, K] of one probe, computed chunk by chunk (only [N, K] is held)."""
    return np.concatenate([_proba(st(c), coef, icpt) for c in _rows(x, mask)])


def fit_probe_streamed(x_train, y_train: np.ndarray, x_test, y_test: np.ndarray, *, C: float | None = None,
                       Cs: tuple[float, ...] = CS, val_frac: float = 0.2, seed: int = 0) -> ProbeFit:
    """`fit_probe` with the torch backend on features streamed from chunks (a ShardedArray, or an array): the
    same validation split, C choice, refit and scores; memory holds one chunk, the labels and [N, K]
    probabilities (the in-memory ``probe="torch"``, which ``auto`` also picks, up to the tolerance)."""
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(f"features and labels differ in length: {len(x_train)}/{len(y_train)}, "
                         f"{len(x_test)}/{len(y_test)}")
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise UserError(f"probe needs at least 2 classes in the training labels, got {classes.tolist()}")
    ytr, K = _encode(y_train, classes), len(classes)
    start = None  # as in `fit_probe`: the refit starts from the chosen C's solution on the training part
    if C is None:
        C = 1.0
        if len(Cs) == 1:
            C = float(Cs[0])
        else:
            rng = np.random.default_rng([seed, 11])  # the split of _select_C, draw for draw
            val = np.zeros(len(ytr), bool)
            for c in range(K):
                idx = rng.permutation(np.flatnonzero(ytr == c))
                val[idx[:int(len(idx) * val_frac)]] = True
            if val.any() and not val.all():
                st_a = stream_standardiser(x_train, ~val)
                coef, icpt = _fit_stream(x_train, ~val, st_a, ytr[~val], tuple(Cs), K)
                yv = ytr[val]
                scores = [-np.log(np.maximum(_stream_proba(x_train, val, st_a, coef[i], icpt[i])[
                    np.arange(len(yv)), yv], _EPS)).mean() for i in range(len(Cs))]
                best = int(np.argmin(scores))
                C, start = float(Cs[best]), (coef[best:best + 1], icpt[best:best + 1])
    st = stream_standardiser(x_train, None)
    coef, icpt = _fit_stream(x_train, None, st, ytr, (C,), K, start)
    coef, icpt = coef[0], icpt[0]
    proba = _stream_proba(x_test, None, st, coef, icpt)
    pred = classes[proba.argmax(1)]
    yte = _encode(y_test, classes)
    p_true = np.where(yte >= 0, proba[np.arange(len(yte)), yte.clip(0)], 0.0)
    correct = pred == y_test
    return ProbeFit(acc=float(correct.mean()), bal_acc=float(balanced_accuracy_score(y_test, pred)),
                    xent=float(-np.log(np.maximum(p_true, _EPS)).mean()), C=float(C), backend="torch-stream",
                    classes=classes, pred=pred, correct=correct, coef=coef, intercept=icpt, standardiser=st)


def fit_proba_grid_streamed(x, train: np.ndarray, evaluate: np.ndarray, y: np.ndarray, n_classes: int, *,
                            Cs: tuple[float, ...] = CS, seed: int = 0,
                            init: tuple[np.ndarray, np.ndarray] | None = None
                            ) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """`fit_proba_grid` where train and eval rows are masks over the rows of one streamed `x` (labels `y` over
    all rows): the online MDL's growing prefixes without gathering them. Eval probabilities come in row order."""
    y_train = y[train]
    classes = np.unique(y_train)
    n_eval = int(evaluate.sum())
    if len(classes) == 1:
        out = np.zeros((n_eval, n_classes), np.float64)
        out[:, classes[0]] = 1.0
        return [out] * len(Cs), init
    st = stream_standardiser(x, train)
    start = None if init is None else (init[0][:, classes], init[1][:, classes])
    coef, icpt = _fit_stream(x, train, st, _encode(y_train, classes), tuple(Cs), len(classes), start)
    probas = []
    for c in range(len(Cs)):
        out = np.zeros((n_eval, n_classes), np.float64)
        out[:, classes] = _stream_proba(x, evaluate, st, coef[c], icpt[c])
        probas.append(out)
    full_coef = np.zeros((len(Cs), n_classes, coef.shape[2]), np.float32)
    full_icpt = np.zeros((len(Cs), n_classes), np.float32)
    full_coef[:, classes], full_icpt[:, classes] = coef, icpt
    return probas, (full_coef, full_icpt)
