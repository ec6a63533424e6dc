"""Attribution by path: how much of a decision each path carries, where each path looks, and what it causes.

The instruments here (`path_shares`, `path_maps`, `causal_tests`) take a model and `LabeledImages`; the job
`experiments.attribute.run_attribution` (the `probe attribute` command) chains them and measures, on a frozen
model:

1. Path shares. Layer integrated gradients (captum `LayerIntegratedGradients`, zero-image baseline = the dataset
   mean colour) at a *cut* (see `probes.causal`): the merge point of the last step (y_{n-1} | x_n) and the final
   representation. Attributions summed over the slow and over the fast channels give each path's part of
   F(x) - F(baseline), for the fine logit of the true class and for the coarse score of the true coarse class
   (log-sum-exp of the fine logits of its group). Completeness is checked: the mean |convergence delta| (captum)
   over the mean |F(x) - F(baseline)| above `max_delta`, for any cut and level, raises `CompletenessError` (one
   line; exit 2 in the CLI) after the delta metrics are logged. The mean, not the worst image, because the
   shares are ratios of means; the worst image is logged too (`delta.rel_max`).
2. Where each path looks. Linear probes (`probes.linear.fit_probe`, fine labels) on pooled slow / fast features
   (`probes.features.extract`) are put back on top of the frozen model as a torch head; the input attribution of
   the probe's true-class logit (`method`) gives one spatial map per image and path (summed over colour
   channels; saliency is the signed gradient). Each map is summarised by its low-frequency energy share (power
   spectrum at spatial frequencies <= `LOW_FREQ` cycles/pixel, i.e. periods of 8 px or more, DC included) and
   its spatial entropy (entropy of |map| normalised by log(H*W): 1 = spread evenly, 0 = one pixel).
   Compare paths within one method: occlusion (window H/7, stride half of it) smooths its maps, so its
   low-frequency shares run high for every path. DeepLift's rules are exact for ReLU networks (ResNet) only;
   on DeiT/Swin (GELU, LayerNorm, attention) `map.*.delta_rel` shows how far its maps miss completeness.
3. Causal tests and damage-matched controls (`probes.causal`).

Metric names (level = fine | coarse, path = slow | fast, mode = zero | mean | resample):
    share.{path}.{level}            merge point: mean path attribution / mean total attribution (the two sum to 1)
    share_final.{path}.{level}      the same at the final representation
    abs_share.{path}.{level}        merge point: mean over images of |A_path| / (|A_slow| + |A_fast|)
    attr.{path|total}.{level}       merge point: mean attribution; outdiff.{level}: mean F(x) - F(baseline)
    delta.max                       largest |convergence delta| of the path attributions (all cuts and levels)
    delta.rel                       largest mean|delta| / mean|F(x) - F(baseline)| over cuts and levels (checked)
    delta.rel_max                   the same with max|delta| over images (the worst image; not checked)
    probe.{path}.acc                test accuracy of the fine probe on the path's pooled features
    map.{path}.low_freq_share       mean low-frequency energy share of the path's input maps
    map.{path}.entropy              mean spatial entropy of the path's input maps
    map.{path}.delta_max            largest |convergence delta| of the maps (ig, gradshap, deeplift)
    map.{path}.delta_rel            mean |delta| / mean |probe(x) - probe(0)| (ig, deeplift; reported, not checked)
    acc.fine, acc.coarse            clean accuracy (coarse prediction: argmax of the coarse scores)
    ablate.{path}.{mode}.fine_drop | coarse_drop | loss_increase     ablating the path at the merge point
    control.{path}.{mode}.k | fine_drop | coarse_drop | loss_increase    random channels, matched loss increase
    selectivity.{path}.{mode}       (fine drop - coarse drop) of the path minus that of its control;
                                    .ci_low / .ci_high: bootstrap 95% CI over images
    selectivity.{path}              the same for the first mode asked for (zero by default)
    patch.{path}.follow_fine | follow_coarse | keep_fine | keep_coarse | pairs_fine | pairs_coarse
                                    the path patched in from a donor image (resample mode): how often the
                                    prediction becomes the donor's / stays the recipient's, among the pairs
                                    whose clean predictions differ
Artifacts: summary.json, tables/shares_by_class.json, tables/causal.json, maps/stats.json, maps/grid.png.

Baselines (no paths) get the matched contiguous split of their paired Steps model (`probes.features`) at the
last block's input and at the final representation, and probes on ``matched.contiguous.slow|fast``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.errors import UserError
from models.sites import intervene, path_split, site_modules
from probes import causal
from probes.choices import ATTRIBUTION_LEVELS, ATTRIBUTION_PATHS, METHODS
from probes.causal import ABLATIONS, Cut, coarse_scores
from probes.features import extract, feature_specs, pool_site
from probes.linear import fit_probe
from probes.measures import bootstrap_ci
from probes.runtime import LabeledImages, bar_disabled, batches

__all__ = ["METHODS", "PATHS", "LEVELS", "LOW_FREQ", "CompletenessError", "CoarseHead", "Shares", "path_shares",
           "shares_by_class", "ProbeHead", "probe_head", "path_features", "input_maps", "map_stats", "map_grid",
           "path_maps", "causal_tests", "matched_split", "check_choice"]

PATHS, LEVELS = ATTRIBUTION_PATHS, ATTRIBUTION_LEVELS
LOW_FREQ = 0.125  # cycles/pixel: a quarter of Nyquist


class CompletenessError(UserError):
    """Attributions do not add up to the output difference (captum's convergence delta is too large)."""


def check_choice(kind: str, value: str, allowed: Sequence[str]) -> str:
    """`value` if it is one of `allowed`, else a one-line UserError."""
    if value not in allowed:
        raise UserError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")
    return value


class CoarseHead(nn.Module):
    """The model's coarse scores: log-sum-exp of its fine logits over each coarse group."""

    def __init__(self, model: nn.Module, fine_to_coarse: Sequence[int]):
        super().__init__()
        self.model = model
        self.register_buffer("f2c", torch.tensor(list(fine_to_coarse)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return coarse_scores(self.model(x), self.f2c)


# ------------------------------------------------------------------------------------------- path shares

@dataclass
class Shares:
    """Per-image path attributions at one cut for one label level (CPU tensors)."""
    cut: str
    level: str
    slow: torch.Tensor
    fast: torch.Tensor
    outdiff: torch.Tensor   # F(x) - F(baseline) of the attributed output
    delta: torch.Tensor     # captum's convergence delta: total attribution - outdiff
    label: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.slow + self.fast

    def summary(self) -> dict[str, float]:
        """share/abs_share per path, mean attributions, delta.max, delta.rel(_max) (see the module docstring)."""
        total = float(self.total.mean())
        denom = (self.slow.abs() + self.fast.abs()).clamp_min(1e-12)
        out = {"attr.slow": float(self.slow.mean()), "attr.fast": float(self.fast.mean()), "attr.total": total,
               "outdiff": float(self.outdiff.mean()), "delta.max": float(self.delta.abs().max()),
               "delta.rel": float(self.delta.abs().mean() / self.outdiff.abs().mean().clamp_min(1e-12)),
               "delta.rel_max": float(self.delta.abs().max() / self.outdiff.abs().mean().clamp_min(1e-12))}
        for path in ("slow", "fast"):
            part = getattr(self, path)
            out[f"share.{path}"] = float(part.mean()) / total if total else float("nan")
            out[f"abs_share.{path}"] = float((part.abs() / denom).mean())
        return out


def path_shares(model: nn.Module, ds: LabeledImages, cut: Cut, *, level: str = "fine", n_steps: int = 32,
                batch_size: int = 16, internal_batch_size: int = 256, device: str | torch.device = "cpu",
                progress: bool | None = None) -> Shares:
    """Layer integrated gradients of the true-label fine logit (or coarse score) at `cut`, split by path."""
    check_choice("level", level, LEVELS)
    forward = model if level == "fine" else CoarseHead(model, ds.fine_to_coarse).to(device)
    modules = site_modules(model)
    with warnings.catch_warnings():
        # captum warns about several layers; the sites of a cut are parallel (neither feeds the other).
        warnings.simplefilter("ignore", UserWarning)
        lig = _captum().LayerIntegratedGradients(forward, [modules[s] for s in cut.sites])
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("slow", "fast", "outdiff", "delta", "label")}
    bar = tqdm(total=len(ds), desc=f"shares {cut.name}/{level}", unit="img", leave=False, disable=bar_disabled(progress))
    for images, fine, coarse in batches(ds, batch_size, shuffle=False, device=device):
        target = fine if level == "fine" else coarse
        base = torch.zeros_like(images)
        attrs, delta = lig.attribute(images, baselines=base, target=target, n_steps=n_steps,
                                     internal_batch_size=max(internal_batch_size, len(images)),
                                     return_convergence_delta=True)
        chans = cut.split_channels([a.detach().float() for a in attrs])
        with torch.no_grad():
            rows = torch.arange(len(images), device=images.device)
            diff = forward(images)[rows, target] - forward(base)[rows, target]
        parts["slow"].append(chans[:, :cut.split].sum(1).cpu())
        parts["fast"].append(chans[:, cut.split:].sum(1).cpu())
        parts["outdiff"].append(diff.float().cpu())
        parts["delta"].append(delta.detach().float().cpu())
        parts["label"].append(target.cpu())
        bar.update(len(images))
    bar.close()
    return Shares(cut.name, level, **{k: torch.cat(v) for k, v in parts.items()})


def shares_by_class(shares: Shares, names: Sequence[str]) -> list[dict]:
    """One row per class of the attributed level: n, mean slow / fast attribution and the fast share."""
    rows = []
    for c, name in enumerate(names):
        sel = shares.label == c
        if not sel.any():
            continue
        slow, fast = float(shares.slow[sel].mean()), float(shares.fast[sel].mean())
        rows.append({"cut": shares.cut, "level": shares.level, "class": name, "n": int(sel.sum()),
                     "attr.slow": slow, "attr.fast": fast,
                     "share.fast": fast / (slow + fast) if slow + fast else float("nan")})
    return rows


def _captum():
    import captum.attr  # imported on use: captum is slow to import and only attribution needs it
    return captum.attr


# ------------------------------------------------------------------------------------------------- maps

class ProbeHead(nn.Module):
    """Frozen model -> pooled channels of one site -> a fitted linear probe's logits; differentiable in the image."""

    def __init__(self, model: nn.Module, site: str, pool: str, select, fit):
        super().__init__()
        self.model, self.site, self.pool, self.select = model, site, pool, select
        st = fit.standardiser
        # Fold the standardisation into the linear map: W (x - m) / s + b.
        weight = torch.as_tensor(fit.coef / st.scale[None, :], dtype=torch.float32)
        bias = torch.as_tensor(fit.intercept - (fit.coef * (st.mean / st.scale)[None, :]).sum(1), dtype=torch.float32)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.classes = torch.as_tensor(fit.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store: dict[str, torch.Tensor] = {}
        with intervene(self.model, {}, capture=[self.site], store=store):
            self.model(x)
        feats = self.select(pool_site(store[self.site], self.model, self.pool).float())
        return feats.flatten(1) @ self.weight.T + self.bias

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        """Probe output index of each label (labels the probe never saw map to its nearest class index)."""
        return torch.searchsorted(self.classes.to(labels.device), labels).clamp_max(len(self.classes) - 1)


def path_features(model: nn.Module) -> dict[str, str]:
    """path -> feature name of `probes.features`: slow_path/fast_path, or a baseline's matched contiguous split."""
    if path_split(model) is not None:
        return {"slow": "slow_path", "fast": "fast_path"}
    return {"slow": "matched.contiguous.slow", "fast": "matched.contiguous.fast"}


def probe_head(model: nn.Module, train_ds: LabeledImages, test_ds: LabeledImages, feature: str, *,
               pool: str = "mean", seed: int = 0, device: str | torch.device = "cpu",
               model_name: str | None = None) -> tuple[ProbeHead, float]:
    """Fit a fine-label probe on `feature` (train split), return it as a `ProbeHead` and its test accuracy."""
    feats = extract(model, train_ds, [feature], pool=pool, device=device, model_name=model_name)[feature]
    test = extract(model, test_ds, [feature], pool=pool, device=device, model_name=model_name)[feature]
    fit = fit_probe(feats, train_ds.fine.numpy(), test, test_ds.fine.numpy(), seed=seed)
    spec = feature_specs(model, model_name=model_name, random_splits=0)[feature]
    return ProbeHead(model, spec.site, pool, spec.select, fit).to(device), fit.acc


def input_maps(head: nn.Module, images: torch.Tensor, target: torch.Tensor, method: str, *, n_steps: int = 32,
               internal_batch_size: int = 256, references: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Input attribution of `head`'s `target` outputs -> maps [B, H, W] (summed over colour channels) and the
    convergence delta where the method has one (ig, gradshap, deeplift), else None."""
    A = _captum()
    check_choice("method", method, METHODS)
    zeros = torch.zeros_like(images)
    images = images.detach().clone().requires_grad_()  # captum would set it (with a warning) for gradients
    delta = None
    if method == "ig":
        attr, delta = A.IntegratedGradients(head).attribute(
            images, baselines=zeros, target=target, n_steps=n_steps,
            internal_batch_size=max(internal_batch_size, len(images)), return_convergence_delta=True)
    elif method == "saliency":
        attr = A.Saliency(head).attribute(images, target=target, abs=False)  # signed: keeps the spatial pattern
    elif method == "gradshap":
        refs = zeros[:1] if references is None else references
        attr, delta = A.GradientShap(head).attribute(images, baselines=refs, n_samples=8, target=target,
                                                     return_convergence_delta=True)
    elif method == "deeplift":
        attr, delta = A.DeepLift(head).attribute(images, baselines=zeros, target=target,
                                                 return_convergence_delta=True)
    else:
        c, h, w = images.shape[1:]
        win = max(2, h // 7)
        attr = A.Occlusion(head).attribute(images, sliding_window_shapes=(c, win, win),
                                           strides=(c, max(1, win // 2), max(1, win // 2)), baselines=0,
                                           target=target, perturbations_per_eval=max(1, internal_batch_size
                                                                                     // len(images)))
    return attr.detach().float().sum(1), None if delta is None else delta.detach().float()


def map_stats(maps: torch.Tensor, low_freq: float = LOW_FREQ) -> dict[str, torch.Tensor]:
    """Per map [B, H, W]: `low_freq_share` (power at frequencies <= low_freq cycles/px over all power, DC
    included) and `entropy` (of |map| as a distribution over pixels, divided by log(H*W)). NaN for a zero map."""
    maps = maps.double()
    h, w = maps.shape[-2:]
    power = torch.fft.fft2(maps).abs() ** 2
    radius = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w)[None, :] ** 2)
    low = radius <= low_freq
    total = power.sum((-2, -1))
    share = power[:, low].sum(-1) / total
    mass = maps.abs().flatten(1)
    p = mass / mass.sum(1, keepdim=True)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1) / math.log(h * w)
    zero = total == 0
    return {"low_freq_share": share.masked_fill(zero, float("nan")).float(),
            "entropy": entropy.masked_fill(zero, float("nan")).float()}


def map_grid(images: torch.Tensor, maps: dict[str, torch.Tensor], title: str = ""):
    """A matplotlib Figure: one column per image; rows: the image, then one map per path (red +, blue -)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

    rows = ["input", *maps]
    n = len(images)
    fig = Figure(figsize=(1.4 * n + 0.6, 1.5 * len(rows)))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for j in range(n):
        img = images[j].float().cpu()
        img = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0) / 255
        axes[0, j].imshow(img.numpy(), cmap="gray")
        for i, name in enumerate(maps, start=1):
            m = maps[name][j].cpu().numpy()
            lim = float(np.abs(m).max()) or 1.0
            axes[i, j].imshow(m, cmap="bwr", vmin=-lim, vmax=lim)
    for i, name in enumerate(rows):
        axes[i, 0].set_ylabel(name)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def path_maps(model: nn.Module, train_ds: LabeledImages, test_ds: LabeledImages, paths: Sequence[str], *,
              method: str = "ig", pool: str = "mean", n_steps: int = 32, batch_size: int = 16,
              internal_batch_size: int = 256, seed: int = 0, device: str | torch.device = "cpu",
              model_name: str | None = None, grid_images: int = 8, progress: bool | None = None
              ) -> tuple[dict[str, float], dict, object]:
    """Probe each path, attribute its true-class logit to the input over `test_ds`: metrics (probe.*, map.*),
    per-image statistics, and the image grid figure."""
    features = path_features(model)
    metrics: dict[str, float] = {}
    stats: dict[str, dict[str, list[float]]] = {}
    shown: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(seed)
    refs = test_ds.normalise(test_ds.images[torch.randperm(len(test_ds), generator=g)[:8]]).to(device)
    for path in paths:
        head, acc = probe_head(model, train_ds, test_ds, features[path], pool=pool, seed=seed, device=device,
                               model_name=model_name)
        metrics[f"probe.{path}.acc"] = acc
        per: dict[str, list[torch.Tensor]] = {"low_freq_share": [], "entropy": []}
        deltas, first, outdiff = [], [], []
        bar = tqdm(total=len(test_ds), desc=f"maps {path}/{method}", unit="img", leave=False,
                   disable=bar_disabled(progress))
        for images, fine, _ in batches(test_ds, batch_size, shuffle=False, device=device):
            maps, delta = input_maps(head, images, head.target(fine), method, n_steps=n_steps,
                                     internal_batch_size=internal_batch_size, references=refs)
            for k, v in map_stats(maps.cpu()).items():
                per[k].append(v)
            if delta is not None:
                deltas.append(delta.abs().cpu())
            if method in ("ig", "deeplift"):  # zero baseline: the delta relative to what is attributed
                with torch.no_grad():
                    rows, t = torch.arange(len(images), device=device), head.target(fine)
                    outdiff.append((head(images)[rows, t] - head(torch.zeros_like(images))[rows, t]).abs().cpu())
            if sum(len(m) for m in first) < grid_images:
                first.append(maps.cpu())
            bar.update(len(images))
        bar.close()
        shown[path] = torch.cat(first)[:grid_images]
        stats[path] = {k: torch.cat(v).tolist() for k, v in per.items()}
        for k, v in per.items():
            metrics[f"map.{path}.{k}"] = float(np.nanmean(torch.cat(v).numpy()))
        if deltas:
            metrics[f"map.{path}.delta_max"] = float(torch.cat(deltas).max())
        if outdiff:
            metrics[f"map.{path}.delta_rel"] = float(torch.cat(deltas).mean()) / max(float(torch.cat(outdiff).mean()),
                                                                                   1e-12)
    fig = map_grid(test_ds.images[:grid_images], shown, f"{method}: input attribution of the path probes")
    return metrics, stats, fig


# ----------------------------------------------------------------------------------------------- causal

def causal_tests(model: nn.Module, ds: LabeledImages, cut: Cut, paths: Sequence[str], *,
                 modes: Sequence[str] = ABLATIONS, draws: int = 3, seed: int = 0, batch_size: int = 128,
                 device: str | torch.device = "cpu", progress: bool | None = None) -> tuple[dict[str, float], list]:
    """Ablate each path at `cut` in each mode, with its damage-matched random-channel control, and patch it.

    Returns metrics (acc.*, ablate.*, control.*, selectivity.*, patch.*; see the module docstring) and one
    table row per (path, mode) with the control's search curve.
    """
    for mode in modes:
        check_choice("ablation", mode, ABLATIONS)
    kw = dict(batch_size=batch_size, device=device)
    base = causal.evaluate(model, ds, **kw)
    metrics = {"acc.fine": base.fine_acc, "acc.coarse": base.coarse_acc}
    means = causal.site_means(model, ds, cut, **kw) if "mean" in modes else None
    rows = []
    bar = tqdm(total=len(modes) * len(paths), desc=f"ablations {cut.name}", leave=False, disable=bar_disabled(progress))
    for mode in modes:
        control = causal.RandomChannelControl(model, ds, cut, mode, base, draws=draws, seed=seed, means=means,
                                              progress=progress, **kw)
        for path in paths:
            ablated = causal.evaluate(model, ds, cut=cut, mask=cut.path_mask(path), mode=mode, means=means,
                                      seed=seed, **kw)
            effect = causal.ablation_effects(base, ablated)
            k = control.match(effect["loss_increase"])
            c_fine, c_coarse, c_loss = control.mean_outcome(k)
            ctrl = {"k": k, "fine_drop": base.fine_acc - float(c_fine.mean()),
                    "coarse_drop": base.coarse_acc - float(c_coarse.mean()), "loss_increase": c_loss}
            # Per image: (fine - coarse drop) of the path minus that of the control; the mean is the selectivity.
            per_image = (c_fine - ablated.fine_ok) - (c_coarse - ablated.coarse_ok)
            sel = float(per_image.mean())
            _, lo, hi = bootstrap_ci(per_image.numpy(), seed=seed)
            key = f"{path}.{mode}"
            metrics.update({f"ablate.{key}.{m}": v for m, v in effect.items()})
            metrics.update({f"control.{key}.{m}": v for m, v in ctrl.items()})
            metrics.update({f"selectivity.{key}": sel, f"selectivity.{key}.ci_low": lo,
                            f"selectivity.{key}.ci_high": hi})
            if mode == modes[0]:
                metrics.update({f"selectivity.{path}": sel, f"selectivity.{path}.ci_low": lo,
                                f"selectivity.{path}.ci_high": hi})
            row = {"path": path, "mode": mode, "ablate": effect, "control": ctrl, "selectivity": sel,
                   "ci": [lo, hi], "control_curve": {kk: control.loss_increase(kk) for kk in sorted(control.cache)}}
            if mode == "resample":
                patch = causal.patch_follow(base, ablated)
                metrics.update({f"patch.{path}.{m}": v for m, v in patch.items()})
                row["patch"] = patch
            rows.append(row)
            bar.update()
    bar.close()
    return metrics, rows


# ------------------------------------------------------------------------------------------------- run


def matched_split(model: nn.Module, model_name: str | None = None) -> int:
    """Slow channels: the Steps model's own split, or the matched contiguous split of a baseline."""
    own = path_split(model)
    if own is not None:
        return own
    spec = feature_specs(model, model_name=model_name, random_splits=0).get("matched.contiguous.slow")
    if spec is None:
        raise UserError(f"{model_name or type(model).__name__}: no slow/fast paths and no paired Steps model to "
                         "copy a matched split from")
    return int(spec.stop)
