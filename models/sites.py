"""Named activations ("sites") of every model, read or edited from one forward pass.

Site names are stable and the same for Steps models and their timm baselines where the concept exists:

    blocks.{k}                      output of the k-th residual block, counted across the whole model
    final                           the final representation: `forward_features` output, before pooling
                                    (tokens [B, N, C] for DeiT, [B, H, W, C] for Swin, [B, C, H, W] for ResNet)
    logits                          the classifier output
    slow_path / fast_path           Steps models only: the channels of `final` that entered at early steps
                                    [0, C_{n-1}) / at the last step [C_{n-1}, C_n) of the last stage
    stages.{s}.steps.{i}.y_prev     Steps models only: input y_{i-1} of step i of stage s (0-based; i >= 1)
    stages.{s}.steps.{i}.x          Steps models only: the fresh channel group x_i entering step i
    stages.{s}.steps.{i}.y          Steps models only: output y_i of step i

The merge point of the last step is `stages.{S}.steps.{n-1}.y_prev` (slow input) and `...x` (fast input).
DeiT has one stage (s = 0); Swin and ResNet run Steps inside each stage.

A model's sites are resolved once and cached per model instance (weakly: the cache does not keep a model
alive). The cache notices a model whose top-level modules or Steps blocks were replaced (timm's
`prune_intermediate_layers`, a swapped `step.blocks`); after deeper surgery call `forget_sites(model)`.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Iterable, Iterator, Mapping

import torch
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import UserError

__all__ = ["site_modules", "site_names", "channel_dim", "path_split", "forward_paths", "intervene",
           "ablate_channels", "forget_sites", "SiteError", "StepsPaths"]

DERIVED = ("slow_path", "fast_path")


class SiteError(UserError):
    """An unknown site name, or a site this model does not have."""


# model -> (structure key, {site name: module} without "logits"). "logits" is the model itself and is added on
# lookup: a cached value that referenced the model would keep its weak key alive forever.
_SITES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure(model: nn.Module) -> tuple:
    """What the cached sites depend on: the top-level modules and, for Steps models, every step's blocks."""
    key = tuple(map(id, model.children()))
    if isinstance(model, StepsPaths):
        key += tuple(id(step.blocks) for stack in model.steps_stacks() for step in stack.steps)
    return key


def _resolve(model: nn.Module) -> dict[str, nn.Module]:
    if isinstance(model, StepsPaths):
        sites = model.site_modules()
        del sites["logits"]
        return sites
    # timm baselines: their own modules, named like the Steps models' sites.
    if isinstance(model, ResNet):
        blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
        final = model.layer4
    elif isinstance(model, SwinTransformer):
        blocks = [b for stage in model.layers for b in stage.blocks]
        final = model.norm
    elif isinstance(model, VisionTransformer):
        blocks = list(model.blocks)
        final = model.norm
    else:
        raise SiteError(f"model {type(model).__name__} has no known sites; allowed: StepsLab models, "
                        "timm VisionTransformer, SwinTransformer or ResNet")
    sites = {f"blocks.{k}": b for k, b in enumerate(blocks)}
    sites["final"] = final
    return sites


def site_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Map each site name to the module whose output is that site (derived sites excluded)."""
    key = _structure(model)
    cached = _SITES.get(model)
    if cached is None or cached[0] != key:
        cached = _SITES[model] = (key, _resolve(model))
    return {**cached[1], "logits": model}


def forget_sites(model: nn.Module) -> None:
    """Drop `model`'s cached sites (after changing its modules in a way the cache cannot see)."""
    _SITES.pop(model, None)


def site_names(model: nn.Module) -> list[str]:
    """Every site this model offers, derived paths included for Steps models."""
    return _names(model, site_modules(model))


def _names(model: nn.Module, modules: Mapping[str, nn.Module]) -> list[str]:
    return list(modules) + list(DERIVED) if path_split(model) is not None else list(modules)


def channel_dim(model: nn.Module) -> int:
    """Channel axis of the model's block outputs and final representation."""
    return 1 if isinstance(model, ResNet) else -1


def path_split(model: nn.Module) -> int | None:
    """Number of slow-path channels of `final` for a Steps model; None for a model without paths."""
    return model.slow_width if isinstance(model, StepsPaths) else None


def _derive(name: str, final: torch.Tensor, model: nn.Module) -> torch.Tensor:
    split, dim = path_split(model), channel_dim(model)
    width = final.shape[dim]
    return final.narrow(dim, 0, split) if name == "slow_path" else final.narrow(dim, split, width - split)


@contextlib.contextmanager
def intervene(model: nn.Module, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
              capture: Iterable[str] = (), store: dict | None = None) -> Iterator[dict]:
    """Within the block, replace site tensors by `edits[name](tensor)` and record `capture` sites.

    Example: ablate the fast path at the last merge point of a Steps-DeiT:
        with intervene(model, {"stages.0.steps.3.x": torch.zeros_like}):
            logits = model(images)
    """
    with _intervene(model, site_modules(model), edits, capture, store) as store:
        yield store


@contextlib.contextmanager
def _intervene(model: nn.Module, modules: Mapping[str, nn.Module],
               edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], capture: Iterable[str] = (),
               store: dict | None = None, this_thread: bool = False) -> Iterator[dict]:
    """The hooks of `intervene`; with `this_thread`, they act only on passes made by the calling thread, so
    several threads can each run their own `forward_paths` through one model at once (side-by-side extraction:
    module hooks are shared by every pass)."""
    store = {} if store is None else store
    owner = threading.get_ident() if this_thread else None
    wanted = set(capture)
    unknown = sorted((set(edits) | wanted) - set(modules))
    if unknown:
        raise SiteError(f"unknown site {unknown[0]!r} for {type(model).__name__}; allowed: "
                        f"{_summarise(list(modules))}")

    def make_hook(name):
        def hook(module, args, out):
            if owner is not None and threading.get_ident() != owner:
                return None  # another thread's pass: leave it alone
            if name in edits:
                out = edits[name](out)
            if name in wanted:
                store[name] = out
            return out
        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in set(edits) | wanted]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def forward_paths(model: nn.Module, x: torch.Tensor, names: Iterable[str] | None = None,
                  edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
                  ) -> dict[str, torch.Tensor]:
    """Run the model once and return the requested sites as a name -> tensor mapping.

    `names=None` returns every site. `edits` replaces site tensors during the pass (see `intervene`).
    Thread-safe for a model in eval mode: calls from several threads at once each see only their own pass.
    """
    modules = site_modules(model)  # resolved once for the names and the hooks
    available = _names(model, modules)
    names = list(available) if names is None else list(names)
    for n in names:
        if n in DERIVED and path_split(model) is None:
            raise SiteError(f"site {n!r}: {type(model).__name__} is a baseline without slow/fast paths; "
                            "allowed: a Steps model, or a matched channel split of 'final'")
        if n not in available:
            raise SiteError(f"unknown site {n!r} for {type(model).__name__}; allowed: {_summarise(available)}")
    capture = {n for n in names if n not in DERIVED}
    if any(n in DERIVED for n in names):
        capture.add("final")
    with _intervene(model, modules, edits or {}, capture, this_thread=True) as store:
        model(x)
    out = {n: store[n] if n not in DERIVED else _derive(n, store["final"], model) for n in names}
    return out


def ablate_channels(start: int, stop: int, dim: int = -1, value: float | torch.Tensor = 0.0
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit that sets channels [start, stop) along `dim` to `value` (a number or a broadcastable tensor)."""
    def edit(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.narrow(dim, start, stop - start).copy_(torch.as_tensor(value, dtype=t.dtype, device=t.device)
                                                 .expand_as(t.narrow(dim, start, stop - start)))
        return t
    return edit


def _summarise(names: list[str]) -> str:
    if len(names) <= 8:
        return ", ".join(names)
    return ", ".join(names[:4]) + f", ... ({len(names)} sites; see models.sites.site_names)"


class StepsPaths:
    """Mixin for Steps models: site names from their `StepsStack`s, `forward_paths` and the path split.

    A family implements `steps_stacks()` (one stack per stage, in order) and `block_modules()` (every
    residual block in execution order, transition blocks included); it calls `self.final(x)` on its
    `forward_features` output.
    """

    def steps_stacks(self) -> list:
        raise NotImplementedError

    def block_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    @property
    def step_widths(self) -> list[list[int]]:
        """Cumulative widths C_1..C_n of each stage's steps."""
        return [stack.widths for stack in self.steps_stacks()]

    @property
    def step_depths(self) -> list[list[int]]:
        """Blocks per step, per stage."""
        return [stack.depths for stack in self.steps_stacks()]

    @property
    def slow_width(self) -> int:
        """Slow-path channels of `final`: those of the last stage that entered before its last step."""
        return self.steps_stacks()[-1].slow_width

    def site_modules(self) -> dict[str, nn.Module]:
        sites: dict[str, nn.Module] = {f"blocks.{k}": b for k, b in enumerate(self.block_modules())}
        for s, stack in enumerate(self.steps_stacks()):
            for i, step in enumerate(stack.steps):
                prefix = f"stages.{s}.steps.{i}"
                if step.y_prev is not None:
                    sites[f"{prefix}.y_prev"] = step.y_prev
                sites[f"{prefix}.x"] = step.x
                sites[f"{prefix}.y"] = step.y
        sites["final"] = self.final
        sites["logits"] = self
        return sites

    def forward_paths(self, x: torch.Tensor, names: Iterable[str] | None = None,
                      edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
                      ) -> dict[str, torch.Tensor]:
        """Named activations from one forward pass; see the module docstring for the names."""
        return forward_paths(self, x, names, edits)
