"""Linear probes: standardise, then multinomial logistic regression, C chosen on a seeded validation split.

`fit_probe` picks C from `CS` by validation cross-entropy on a stratified 20% of train (seeded), refits on all of
train, and scores the test split (top-1, balanced accuracy, cross-entropy, per-image correctness).

Two backends give the same model (L2-regularised multinomial logistic regression on standardised features,
objective ``C * sum(cross-entropy) + ||W||^2 / 2`` as scikit-learn's):
    sklearn   `sklearn.linear_model.LogisticRegression` (lbfgs), for features that fit comfortably
    torch     full-batch L-BFGS in torch, on the GPU when there is one, for big features (token probes)
``auto`` picks torch above `AUTO_TORCH_ABOVE` feature values (n x d), or above a tenth of it on a GPU.

Features may be ``[N, C]`` or ``[N, T, C]`` (token features); the probe sees them flattened to ``[N, T*C]``.
Cross-entropy is reported in nats per test image.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from threadpoolctl import ThreadpoolController

from models.errors import UserError
from probes.choices import PROBES

__all__ = ["PROBES", "CS", "AUTO_TORCH_ABOVE", "ProbeFit", "Standardiser", "fit_probe", "fit_proba",
           "choose_backend", "flat", "small_blas"]

CS = (0.01, 0.1, 1.0, 10.0)  # regularisation grid; features are standardised so one grid fits all
AUTO_TORCH_ABOVE = 4_000_000
_EPS = 1e-12
_SMALL = 2_000_000  # feature values below which a fit runs on one BLAS thread


@functools.lru_cache(maxsize=1)
def _controller() -> ThreadpoolController:
    return ThreadpoolController()  # finds the BLAS libraries once (each lookup reads /proc/self/maps)


def small_blas(n_values: int) -> contextlib.AbstractContextManager:
    """One BLAS thread for small problems: on a busy CPU, and next to torch's own thread pool, threads on tiny
    matrices cost far more than they give (a 320 x 128 SVD took 2.4 s instead of 5 ms on 2 shared cores)."""
    return _controller().limit(limits=1) if n_values < _SMALL else contextlib.nullcontext()


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
    """Resolve ``auto`` by size (see module docstring); check the name."""
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


def _fit_torch(x: np.ndarray, y: np.ndarray, C: float, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.as_tensor(x, device=dev), torch.as_tensor(y, device=dev)
    w = (0.01 * torch.randn(x.shape[1], n_classes, generator=g)).to(dev).requires_grad_()
    b = torch.zeros(n_classes, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)
    reg = 1.0 / (2 * C * len(x))  # sklearn's objective divided by C * n

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + reg * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().T.cpu().numpy(), b.detach().cpu().numpy()


def _fit(x: np.ndarray, y: np.ndarray, C: float, backend: str, n_classes: int, seed: int):
    if backend == "torch":
        return _fit_torch(x, y, C, n_classes, seed)
    return _fit_sklearn(x, y, C, seed)


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
    xtr, xev = flat(x_train), flat(x_eval)
    out = np.zeros((len(xev), n_classes), np.float64)
    classes = np.unique(y_train)
    if len(classes) == 1:
        out[:, classes[0]] = 1.0
        return out
    st = Standardiser.fit(xtr)
    coef, icpt = _fit(st(xtr), _encode(y_train, classes), C, choose_backend(probe, *xtr.shape), len(classes),
                      seed)
    out[:, classes] = _proba(st(xev), coef, icpt)
    return out


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
        C = _select_C(xtr, ytr, len(classes), backend, Cs, val_frac, seed)
    st = Standardiser.fit(xtr)
    coef, icpt = _fit(st(xtr), ytr, C, backend, len(classes), seed)
    proba = _proba(st(xte), coef, icpt)
    pred = classes[proba.argmax(1)]
    yte = _encode(y_test, classes)
    p_true = np.where(yte >= 0, proba[np.arange(len(yte)), yte.clip(0)], 0.0)
    correct = pred == y_test
    return ProbeFit(acc=float(correct.mean()), bal_acc=float(balanced_accuracy_score(y_test, pred)),
                    xent=float(-np.log(np.maximum(p_true, _EPS)).mean()), C=float(C), backend=backend,
                    classes=classes, pred=pred, correct=correct, coef=coef, intercept=icpt, standardiser=st)


def _select_C(x: np.ndarray, y: np.ndarray, n_classes: int, backend: str, Cs: tuple[float, ...],
              val_frac: float, seed: int) -> float:
    """The C with the lowest validation cross-entropy on a seeded, stratified hold-out of train.

    Cross-entropy rather than accuracy: accuracy ties on easy features and would pick an over-regularised,
    under-confident probe, which inflates the cross-entropy and MDL that reuse this C.
    """
    if len(Cs) == 1:
        return float(Cs[0])
    rng = np.random.default_rng([seed, 11])
    val = np.zeros(len(y), bool)
    for c in range(n_classes):  # stratified: every class keeps training examples
        idx = rng.permutation(np.flatnonzero(y == c))
        val[idx[:int(len(idx) * val_frac)]] = True
    if not val.any() or val.all():
        return 1.0
    st = Standardiser.fit(x[~val])
    xa, xv = st(x[~val]), st(x[val])
    scores = []
    for C in Cs:
        coef, icpt = _fit(xa, y[~val], C, backend, n_classes, seed)
        p = _proba(xv, coef, icpt)[np.arange(val.sum()), y[val]]
        scores.append(-np.log(np.maximum(p, _EPS)).mean())
    return float(Cs[int(np.argmin(scores))])
