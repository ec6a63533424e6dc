"""Linear probes: standardise, then multinomial logistic regression, C chosen on a seeded validation split.

`fit_probe` picks C from `CS` by validation cross-entropy on a stratified 20% of train (seeded), refits on all of
train, and scores the test split (top-1, balanced accuracy, cross-entropy, per-image correctness).

Two backends fit the same model (L2-regularised multinomial logistic regression on standardised features,
objective ``C * sum(cross-entropy) + ||W||^2 / 2`` as scikit-learn's):
    sklearn   `sklearn.linear_model.LogisticRegression` (lbfgs, at most 100 iterations), for features that fit
              comfortably
    torch     full-batch L-BFGS in torch (at most 300 iterations, max |gradient| below 1e-6), on the GPU when there
              is one, for big features (token probes); loss and gradient by hand, one thread for small problems
``auto`` picks torch above `AUTO_TORCH_ABOVE` feature values (n x d), or above a tenth of it on a GPU. Both stop at
an iteration cap, and at the largest C of the grid that cap binds (slow path, fine labels, C = 10, 60k images:
sklearn's test accuracy 0.707 / 0.734 / 0.762 after 100 / 300 / 1000 iterations), so the recorded numbers are
those of these exact solvers; `_fit` keeps each C its own solve from the seeded start for that reason.

Features may be ``[N, C]`` or ``[N, T, C]`` (token features); the probe sees them flattened to ``[N, T*C]``.
Cross-entropy is reported in nats per test image.

Out of core: `fit_probe_streamed` and `fit_proba_grid_streamed` take features that need not fit in memory (a
`probes.shards.ShardedArray`, or anything with ``chunks()`` and ``shape``) and fit the torch backend's probe: the
standardiser from streamed sums, then the same L-BFGS (each C from the same seeded start, the same caps) on the
exact full-batch loss and gradient, accumulated chunk by chunk over the memory-mapped shards: the in-memory
``probe="torch"`` fit up to float rounding. (``auto`` picks sklearn for small features in memory.)
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from threadpoolctl import ThreadpoolController

from models.errors import UserError
from probes.choices import PROBES

__all__ = ["PROBES", "CS", "AUTO_TORCH_ABOVE", "ProbeFit", "Standardiser", "fit_probe", "fit_proba", "fit_proba_grid",
           "fit_probe_streamed", "fit_proba_grid_streamed", "stream_standardiser", "choose_backend", "flat",
           "small_blas"]

AUTO_TORCH_ABOVE = 4_000_000
CS = (0.01, 0.1, 1.0, 10.0)  # regularisation grid; features are standardised so one grid fits all
_EPS = 1e-12
_SMALL = 2_000_000  # feature values below which a fit runs on one BLAS thread


@functools.lru_cache(maxsize=1)
def _controller() -> ThreadpoolController:
    return ThreadpoolController()  # finds the BLAS libraries once (each lookup reads /proc/self/maps)


def small_blas(n_values: int) -> contextlib.AbstractContextManager:
    """One BLAS thread for small problems: on a busy CPU, and next to torch's own thread pool, threads on tiny
    matrices cost far more than they give (a 320 x 128 SVD took 2.4 s instead of 5 ms on 2 shared cores)."""
    return _controller().limit(limits=1) if n_values < _SMALL else contextlib.nullcontext()


@contextlib.contextmanager
def _small_torch(n_values: int):
    """The same for torch's CPU thread pool: an L-BFGS step is many tiny ops, each a thread handoff when the
    pool has two threads (41 evaluations of a 2000 x 64 probe took 1.7 s on 2 busy cores)."""
    if n_values >= _SMALL or torch.cuda.is_available():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def choose_backend(probe: str, n: int, d: int) -> str:
    """Resolve ``auto`` by size (torch above `AUTO_TORCH_ABOVE` feature values, or a tenth of it on a GPU) and
    check the name."""
    if probe not in PROBES:
        raise UserError(f"unknown probe {probe!r}; allowed: {', '.join(PROBES)}")
    if probe != "auto":
        return probe
    limit = AUTO_TORCH_ABOVE // 10 if torch.cuda.is_available() else AUTO_TORCH_ABOVE
    return "torch" if n * d > limit else "sklearn"


def _fit_sklearn(x: np.ndarray, y: np.ndarray, C: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    clf = LogisticRegression(C=C, max_iter=100, random_state=seed)
    with warnings.catch_warnings(), small_blas(x.size):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe at max_iter is still a fine probe
        clf.fit(x, y)
    coef, icpt = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # sklearn stores a binary problem as one row: logit(class 1) - logit(class 0)
        coef, icpt = np.concatenate([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
    return coef.astype(np.float32), icpt.astype(np.float32)


def _fit_torch(x: np.ndarray, y: np.ndarray, Cs: tuple[float, ...], n_classes: int, seed: int,
               init: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One full-batch L-BFGS over ``len(Cs)`` independent problems that share `x`: the objective is the sum of
    their objectives, so each one's optimum is the joint optimum, and an evaluation costs one matmul with all
    their weights side by side instead of one per C. `init` (coef ``[m, K, D]``, intercept ``[m, K]``) warm-starts
    the solve. The problem is strictly convex, so a converged solve (max |gradient| below 1e-6, at most 300
    iterations) gives the same probe whatever the start: warm starts change the time, not the result.
    Returns coef ``[m, K, D]`` and intercept ``[m, K]``."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m, (n, d) = len(Cs), x.shape
    xt, yt = torch.as_tensor(x, device=dev), torch.as_tensor(y, device=dev)
    if init is None:  # each C from the same seeded start (as a solve of its own would)
        w0 = torch.stack([0.01 * torch.randn(d, n_classes, generator=torch.Generator().manual_seed(seed)).T
                          for _ in Cs])
        b0 = torch.zeros(m, n_classes)
    else:
        w0, b0 = torch.as_tensor(init[0]), torch.as_tensor(init[1])
    w = w0.permute(2, 0, 1).reshape(d, m * n_classes).contiguous().to(dev)  # [D, m*K]
    b = b0.reshape(m * n_classes).contiguous().to(dev)
    reg = torch.tensor([1.0 / (2 * C * n) for C in Cs], device=dev)  # sklearn's objective divided by C * n
    onehot = F.one_hot(yt.long(), n_classes).to(xt.dtype)[:, None, :]  # [N, 1, K], broadcast over the Cs
    reg_w = reg.repeat_interleave(n_classes)  # per column of w
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    @torch.no_grad()
    def closure():
        # Loss and gradient by hand: two matmuls and a softmax, about half of what autograd spends here.
        logp = (xt @ w + b).view(n, m, n_classes).log_softmax(-1)
        loss = -(logp * onehot).sum() / n + (reg_w * w * w).sum()
        dz = ((logp.exp() - onehot) / n).view(n, m * n_classes)
        w.grad = xt.T @ dz + 2 * reg_w * w
        b.grad = dz.sum(0)
        return loss

    with _small_torch(n * d * m):
        opt.step(closure)
    coef = w.detach().view(d, m, n_classes).permute(1, 2, 0).cpu().numpy()
    return coef, b.detach().view(m, n_classes).cpu().numpy()


def _fit(x: np.ndarray, y: np.ndarray, Cs: tuple[float, ...], backend: str, n_classes: int, seed: int,
         init: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Probes for every C of `Cs` on the same data: coef ``[m, K, D]``, intercept ``[m, K]``.

    In memory each C is its own solve from the seeded start: the probes stop at an iteration cap before they
    converge at large C (at C = 10 on 60k Fashion-MNIST features, test accuracy still rises from 100 to 1000
    iterations), so a batched or warm-started solve would stop elsewhere and change the recorded numbers."""
    if backend == "torch":
        fits = [_fit_torch(x, y, (C,), n_classes, seed, None if init is None else (init[0][i:i + 1],
                                                                                     init[1][i:i + 1]))
                for i, C in enumerate(Cs)]
        return np.concatenate([f[0] for f in fits]), np.concatenate([f[1] for f in fits])
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
    coef, icpt = _fit(st(xtr), _encode(y_train, classes), tuple(Cs), choose_backend(probe, *xtr.shape),
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
    backend = choose_backend(probe, *xtr.shape)
    ytr = _encode(y_train, classes)
    if C is None:
        C, _ = _select_C(xtr, ytr, len(classes), backend, Cs, val_frac, seed)
    st = Standardiser.fit(xtr)
    coef, icpt = _fit(st(xtr), ytr, (C,), backend, len(classes), seed)
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


def _fit_torch_stream(x, mask: np.ndarray | None, st: Standardiser, y: np.ndarray, Cs: tuple[float, ...],
                      n_classes: int, seed: int, init: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """`_fit_torch` on the selected rows of `x` (standardised by `st`), the loss and gradient summed chunk by
    chunk; `y` holds the encoded labels of the selected rows in order."""
    x, mask = _compact(x, mask)
    m, n, d = len(Cs), len(y), int(np.prod(x.shape[1:]))
    if init is None:  # the seeded start of `_fit_torch`, so both solvers take the same path
        w0 = torch.stack([0.01 * torch.randn(d, n_classes, generator=torch.Generator().manual_seed(seed)).T
                          for _ in Cs])
        b0 = torch.zeros(m, n_classes)
    else:
        w0, b0 = torch.as_tensor(init[0]), torch.as_tensor(init[1])
    w = w0.permute(2, 0, 1).reshape(d, m * n_classes).contiguous()
    b = b0.reshape(m * n_classes).contiguous()
    reg_w = torch.tensor([1.0 / (2 * C * n) for C in Cs]).repeat_interleave(n_classes)
    onehot = F.one_hot(torch.as_tensor(y).long(), n_classes).float()[:, None, :]
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    @torch.no_grad()
    def closure():
        loss, gw, gb, off = torch.zeros(()), torch.zeros_like(w), torch.zeros_like(b), 0
        for c in _rows(x, mask):
            xt, oh = torch.as_tensor(st(c)), onehot[off:off + len(c)]
            logp = (xt @ w + b).view(len(c), m, n_classes).log_softmax(-1)
            loss += -(logp * oh).sum() / n
            dz = ((logp.exp() - oh) / n).view(len(c), m * n_classes)
            gw += xt.T @ dz
            gb += dz.sum(0)
            off += len(c)
        w.grad, b.grad = gw + 2 * reg_w * w, gb
        return loss + (reg_w * w * w).sum()

    opt.step(closure)
    coef = w.detach().view(d, m, n_classes).permute(1, 2, 0).numpy()
    return coef, b.detach().view(m, n_classes).numpy()


def _fit_stream(x, mask: np.ndarray | None, st: Standardiser, y: np.ndarray, Cs: tuple[float, ...],
                n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each C its own streamed solve from the seeded start, as `_fit` does in memory (the solves stop at an
    iteration cap at large C, so only the same path gives the same numbers)."""
    fits = [_fit_torch_stream(x, mask, st, y, (C,), n_classes, seed) for C in Cs]
    return np.concatenate([f[0] for f in fits]), np.concatenate([f[1] for f in fits])


def _stream_proba(x, mask: np.ndarray | None, st: Standardiser, coef: np.ndarray, icpt: np.ndarray
                  ) -> np.ndarray:
    """Probabilities [n_selected, K] of one probe, computed chunk by chunk (only [N, K] is held)."""
    return np.concatenate([_proba(st(c), coef, icpt) for c in _rows(x, mask)])


def fit_probe_streamed(x_train, y_train: np.ndarray, x_test, y_test: np.ndarray, *, C: float | None = None,
                       Cs: tuple[float, ...] = CS, val_frac: float = 0.2, seed: int = 0) -> ProbeFit:
    """`fit_probe` with the torch backend on features streamed from chunks (a ShardedArray, or an array): the
    same validation split, C choice, refit and scores; memory holds one chunk, the labels and [N, K]
    probabilities. (In memory, ``auto`` picks sklearn for small features: compare with ``probe="torch"``.)"""
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(f"features and labels differ in length: {len(x_train)}/{len(y_train)}, "
                         f"{len(x_test)}/{len(y_test)}")
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise UserError(f"probe needs at least 2 classes in the training labels, got {classes.tolist()}")
    ytr, K = _encode(y_train, classes), len(classes)
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
                coef, icpt = _fit_stream(x_train, ~val, st_a, ytr[~val], tuple(Cs), K, seed)
                yv = ytr[val]
                scores = [-np.log(np.maximum(_stream_proba(x_train, val, st_a, coef[i], icpt[i])[
                    np.arange(len(yv)), yv], _EPS)).mean() for i in range(len(Cs))]
                best = int(np.argmin(scores))
                C = float(Cs[best])
    st = stream_standardiser(x_train, None)
    coef, icpt = _fit_stream(x_train, None, st, ytr, (C,), K, seed)
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
                            Cs: tuple[float, ...] = CS, seed: int = 0
                            ) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """`fit_proba_grid` where train and eval rows are masks over the rows of one streamed `x` (labels `y` over
    all rows): the online MDL's growing prefixes without gathering them. Eval probabilities come in row order."""
    y_train = y[train]
    classes = np.unique(y_train)
    n_eval = int(evaluate.sum())
    if len(classes) == 1:
        out = np.zeros((n_eval, n_classes), np.float64)
        out[:, classes[0]] = 1.0
        return [out] * len(Cs), None
    st = stream_standardiser(x, train)
    coef, icpt = _fit_stream(x, train, st, _encode(y_train, classes), tuple(Cs), len(classes), seed)
    probas = []
    for c in range(len(Cs)):
        out = np.zeros((n_eval, n_classes), np.float64)
        out[:, classes] = _stream_proba(x, evaluate, st, coef[c], icpt[c])
        probas.append(out)
    full_coef = np.zeros((len(Cs), n_classes, coef.shape[2]), np.float32)
    full_icpt = np.zeros((len(Cs), n_classes), np.float32)
    full_coef[:, classes], full_icpt[:, classes] = coef, icpt
    return probas, (full_coef, full_icpt)
