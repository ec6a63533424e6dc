"""Causal tests by path: ablate or patch one path where it enters the last step, against damage-matched controls.

A *cut* is a set of sites that together carry everything the logits depend on, read as one channel axis split
into a slow part [0, split) and a fast part [split, width):

    merge   Steps models: the last step's inputs y_{n-1} (slow) and x_n (fast) of the last stage.
            Baselines: the last block's input (the output of the block before it), split at the paired Steps
            model's slow width (the matched contiguous split), so the same widths are ablated.
    final   the final representation (`final`), split the same way.

Ablation modes replace the chosen channels of a cut by: `zero`; `mean` (the mean over the evaluated images, per
position and channel); `resample` (the same channels of another image of the batch, a random derangement).
Resampling the fast path *is* patching: image i runs with image donor[i]'s fast path, so `patch.*` metrics come
from the same pass (how often the prediction follows the donor where donor and recipient predictions differ).

Damage-matched control: random channel sets of the whole cut (nested, `draws` random orders) are ablated the same
way; the number of channels k is searched (bisection, loss increase ~ monotone in k for nested sets) so the mean
fine-label loss increase matches the path ablation's. Selectivity = (fine drop - coarse drop) of the path minus
that of the control, per image, with a bootstrap CI over images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.errors import UserError
from models.sites import channel_dim, forward_paths, intervene, path_split, site_modules
from probes.choices import ABLATIONS
from probes.runtime import LabeledImages, bar_disabled, batches

__all__ = ["ABLATIONS", "Cut", "merge_cut", "final_cut", "coarse_scores", "Outcome", "evaluate", "site_means",
           "cut_edits", "RandomChannelControl", "ablation_effects", "patch_follow"]



@dataclass(frozen=True)
class Cut:
    """Sites read as one channel axis: `sites[i]` holds `widths[i]` channels; slow = [0, split), fast = the rest."""
    name: str
    sites: tuple[str, ...]
    widths: tuple[int, ...]
    split: int
    dim: int

    @property
    def width(self) -> int:
        return sum(self.widths)

    def pieces(self) -> list[tuple[str, int, int]]:
        """(site, first channel on the cut's axis, width) for each site."""
        starts = [sum(self.widths[:i]) for i in range(len(self.widths))]
        return list(zip(self.sites, starts, self.widths))

    def path_mask(self, path: str) -> torch.Tensor:
        """Boolean [width] mask of the `path` ("slow" or "fast") channels."""
        if path not in ("slow", "fast"):
            raise ValueError(f"path {path!r}; allowed: slow, fast")
        mask = torch.zeros(self.width, dtype=torch.bool)
        mask[:self.split] = True
        return mask if path == "slow" else ~mask

    def split_channels(self, per_site: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-site tensors [B, ..., w_i, ...] -> [B, width]: summed over every axis but batch and channels."""
        cols = []
        for t in per_site:
            t = t.movedim(self.dim, -1)
            cols.append(t.reshape(t.shape[0], -1, t.shape[-1]).sum(1))
        return torch.cat(cols, dim=1)


def _widths(model: nn.Module, sites: Sequence[str], image: torch.Tensor) -> tuple[int, ...]:
    with torch.no_grad():
        acts = forward_paths(model, image[:1], sites)
    return tuple(int(acts[s].shape[channel_dim(model)]) for s in sites)


def _check_split(model: nn.Module, split: int | None) -> int:
    own = path_split(model)
    split = own if own is not None else split
    if split is None:
        raise UserError(f"{type(model).__name__} has no slow/fast paths; allowed: a Steps model, or a baseline "
                         "with the matched split of its paired Steps model")
    if split <= 0:
        raise UserError(f"{type(model).__name__}: a single step has no slow path; allowed: models with >= 2 steps")
    return int(split)


def merge_cut(model: nn.Module, image: torch.Tensor, split: int | None = None) -> Cut:
    """The merge point of the last step (Steps), or the last block's input split at `split` (baselines).

    `image`: one example batch (only its first image runs, to read the widths).
    """
    split = _check_split(model, split)
    if path_split(model) is not None:
        stage = len(model.step_widths) - 1
        step = len(model.step_widths[-1]) - 1
        sites = (f"stages.{stage}.steps.{step}.y_prev", f"stages.{stage}.steps.{step}.x")
        return Cut("merge", sites, _widths(model, sites, image), split, channel_dim(model))
    blocks = [n for n in site_modules(model) if n.startswith("blocks.")]
    # The output of the second-to-last block is the last block's input; `intervene` edits outputs only.
    site = blocks[-2]
    width, final = _widths(model, (site, "final"), image)
    if width != final or split >= width:
        raise ValueError(f"{site} has {width} channels, final {final}, split {split}: the matched split needs the "
                         "last block's input at the final width")
    return Cut("merge", (site,), (width,), split, channel_dim(model))


def final_cut(model: nn.Module, image: torch.Tensor, split: int | None = None) -> Cut:
    """The final representation split into slow / fast channels (matched `split` for baselines)."""
    split = _check_split(model, split)
    widths = _widths(model, ("final",), image)
    if split >= widths[0]:
        raise ValueError(f"split {split} >= final width {widths[0]}")
    return Cut("final", ("final",), widths, split, channel_dim(model))


def coarse_scores(logits: torch.Tensor, fine_to_coarse: torch.Tensor) -> torch.Tensor:
    """Coarse scores [B, K]: log-sum-exp of the fine logits in each coarse group (log P(coarse) up to a constant)."""
    f2c = fine_to_coarse.to(logits.device)
    groups = torch.arange(int(f2c.max()) + 1, device=logits.device)
    outside = f2c[None, None, :] != groups[None, :, None]  # [1, K, num_fine]
    return logits[:, None, :].masked_fill(outside, float("-inf")).logsumexp(-1)


@dataclass
class Outcome:
    """Per-image results of one pass over a dataset (CPU tensors)."""
    fine_pred: torch.Tensor
    coarse_pred: torch.Tensor
    fine_ok: torch.Tensor      # float 0/1
    coarse_ok: torch.Tensor
    loss: torch.Tensor         # fine-label cross-entropy
    donor: torch.Tensor | None = None  # resample: index of the image whose channels were used

    @property
    def fine_acc(self) -> float:
        return float(self.fine_ok.mean())

    @property
    def coarse_acc(self) -> float:
        return float(self.coarse_ok.mean())


def _derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation without fixed points (one cycle through a random order); identity for n == 1."""
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(1)
    return perm


def cut_edits(cut: Cut, mask: torch.Tensor, mode: str, means: dict[str, torch.Tensor] | None = None,
              perm: torch.Tensor | None = None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """`intervene` edits that replace the `mask`ed channels of `cut` by zero, the mean, or image `perm[i]`'s."""
    if mode not in ABLATIONS:
        raise ValueError(f"ablation {mode!r}; allowed: {', '.join(ABLATIONS)}")
    if mode == "mean" and means is None:
        raise ValueError("mean ablation needs site means (see site_means)")
    edits = {}
    for site, start, width in cut.pieces():
        sub = mask[start:start + width]
        if not sub.any():
            continue

        def edit(t: torch.Tensor, sub: torch.Tensor = sub, site: str = site) -> torch.Tensor:
            shape = [1] * t.ndim
            shape[cut.dim] = -1
            keep_new = sub.to(t.device).view(shape)
            if mode == "zero":
                new = torch.zeros_like(t)
            elif mode == "mean":
                new = means[site].to(t.device, t.dtype).expand_as(t)
            else:
                new = t[perm.to(t.device)]
            return torch.where(keep_new, new, t)
        edits[site] = edit
    return edits


@torch.no_grad()
def site_means(model: nn.Module, ds: LabeledImages, cut: Cut, *, batch_size: int = 128,
               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Mean of each cut site over `ds` (per position and channel), shape [1, ...], for mean ablation."""
    sums: dict[str, torch.Tensor] = {}
    for images, _, _ in batches(ds, batch_size, shuffle=False, device=device):
        acts = forward_paths(model, images, cut.sites)
        for s in cut.sites:
            sums[s] = sums.get(s, 0) + acts[s].double().sum(0, keepdim=True)
    return {s: (v / len(ds)).float() for s, v in sums.items()}


@torch.no_grad()
def evaluate(model: nn.Module, ds: LabeledImages, *, cut: Cut | None = None, mask: torch.Tensor | None = None,
             mode: str = "zero", means: dict[str, torch.Tensor] | None = None, seed: int = 0,
             batch_size: int = 128, device: str | torch.device = "cpu") -> Outcome:
    """One pass over `ds`, optionally with the `mask`ed channels of `cut` ablated (`mode`). Per-image outcome.

    Resample pairs images within a batch; the pairing depends only on (`seed`, batch index), so every call with
    the same seed uses the same donors (the path ablation and its controls see the same pairs).
    """
    f2c = torch.tensor(ds.fine_to_coarse)
    out: dict[str, list] = {k: [] for k in ("fine_pred", "coarse_pred", "fine_ok", "coarse_ok", "loss", "donor")}
    start = 0
    for b, (images, fine, coarse) in enumerate(batches(ds, batch_size, shuffle=False, device=device)):
        edits, perm = {}, None
        if cut is not None and mask is not None:
            if mode == "resample":
                perm = _derangement(len(images), torch.Generator().manual_seed(seed * 1_000_003 + b))
                out["donor"].append(perm + start)
            edits = cut_edits(cut, mask, mode, means, perm)
        with intervene(model, edits):
            logits = model(images).float()
        if logits.shape[1] != ds.num_fine:
            raise UserError(f"model has {logits.shape[1]} classes, dataset {ds.name} {ds.num_fine} fine labels")
        fp, cp = logits.argmax(1), coarse_scores(logits, f2c).argmax(1)
        out["fine_pred"].append(fp.cpu())
        out["coarse_pred"].append(cp.cpu())
        out["fine_ok"].append((fp == fine).float().cpu())
        out["coarse_ok"].append((cp == coarse).float().cpu())
        out["loss"].append(F.cross_entropy(logits, fine, reduction="none").cpu())
        start += len(images)
    cat = {k: torch.cat(v) if v else None for k, v in out.items()}
    return Outcome(**cat)


class RandomChannelControl:
    """Ablate nested random channel sets of a cut; find the set size whose loss increase matches a target.

    `draws` random channel orders; k channels = the first k of each order. Results per k are cached, so the
    slow and the fast path (same cut, mode) share one search curve.
    """

    def __init__(self, model: nn.Module, ds: LabeledImages, cut: Cut, mode: str, base: Outcome, *,
                 draws: int = 3, seed: int = 0, means: dict[str, torch.Tensor] | None = None,
                 batch_size: int = 128, device: str | torch.device = "cpu", progress: bool | None = None):
        g = torch.Generator().manual_seed(seed + 17)
        self.orders = [torch.randperm(cut.width, generator=g) for _ in range(draws)]
        self.model, self.ds, self.cut, self.mode, self.base = model, ds, cut, mode, base
        self.kw = dict(means=means, seed=seed, batch_size=batch_size, device=device)
        self.cache: dict[int, list[Outcome]] = {}
        self.progress = progress

    def outcomes(self, k: int) -> list[Outcome]:
        """The `draws` outcomes of ablating k random channels."""
        if k not in self.cache:
            res = []
            for order in self.orders:
                mask = torch.zeros(self.cut.width, dtype=torch.bool)
                mask[order[:k]] = True
                res.append(evaluate(self.model, self.ds, cut=self.cut, mask=mask, mode=self.mode, **self.kw))
            self.cache[k] = res
        return self.cache[k]

    def loss_increase(self, k: int) -> float:
        return sum(float(o.loss.mean()) for o in self.outcomes(k)) / len(self.orders) - float(self.base.loss.mean())

    def match(self, target: float) -> int:
        """The k in [1, width] whose mean loss increase is closest to `target` (bisection on a monotone curve)."""
        lo, hi = 1, self.cut.width
        bar = tqdm(desc=f"control {self.cut.name}/{self.mode}", disable=bar_disabled(self.progress),
                   leave=False, total=max(1, hi.bit_length()))
        while lo < hi:
            mid = (lo + hi) // 2
            if self.loss_increase(mid) >= target:
                hi = mid
            else:
                lo = mid + 1
            bar.update()
        bar.close()
        # lo = the smallest k reaching the target; k - 1 may be closer.
        if lo > 1 and abs(self.loss_increase(lo - 1) - target) < abs(self.loss_increase(lo) - target):
            return lo - 1
        return lo

    def mean_outcome(self, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-image fine and coarse correctness averaged over the draws, and the mean loss increase."""
        outs = self.outcomes(k)
        fine = torch.stack([o.fine_ok for o in outs]).mean(0)
        coarse = torch.stack([o.coarse_ok for o in outs]).mean(0)
        return fine, coarse, self.loss_increase(k)


def ablation_effects(base: Outcome, ablated: Outcome) -> dict[str, float]:
    """fine_drop, coarse_drop (accuracy points, 0..1) and loss_increase of an ablation."""
    return {"fine_drop": base.fine_acc - ablated.fine_acc, "coarse_drop": base.coarse_acc - ablated.coarse_acc,
            "loss_increase": float(ablated.loss.mean() - base.loss.mean())}


def patch_follow(base: Outcome, patched: Outcome) -> dict[str, float]:
    """How often the patched prediction equals the donor's (clean) prediction, among pairs where the donor's
    and the recipient's clean predictions differ; per label level, with the number of such pairs."""
    if patched.donor is None:
        raise ValueError("patch_follow needs a resample outcome (with donors)")
    out: dict[str, float] = {}
    for level in ("fine", "coarse"):
        clean = getattr(base, f"{level}_pred")
        donor_pred, new = clean[patched.donor], getattr(patched, f"{level}_pred")
        differ = donor_pred != clean
        n = int(differ.sum())
        out[f"follow_{level}"] = float((new[differ] == donor_pred[differ]).float().mean()) if n else float("nan")
        out[f"keep_{level}"] = float((new[differ] == clean[differ]).float().mean()) if n else float("nan")
        out[f"pairs_{level}"] = float(n)
    return out
