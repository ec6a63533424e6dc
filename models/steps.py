"""The StepsNet scheme, once (Han et al., "Step by Step Network", arXiv 2511.14329).

The input of a residual stack (tokens after the stem, or a CNN stage's feature map) is split along channels
into groups x_1..x_n. Step i runs an ordinary residual stack F_i of the host family's blocks at the
cumulative width C_i = d_1 + ... + d_i:

    y_1 = F_1(x_1),    y_i = F_i([y_{i-1}, x_i])    (concatenated along channels),   output y_n.

Widths grow narrow to wide, C_i ~= C_{i+1}/sqrt(2), so a block of step i costs about half a block of step
i+1. The *slow path* is the channels [0, C_{n-1}) of the output (they entered early and crossed many
blocks); the *fast path* is the channels [C_{n-1}, C_n) (x_n, which entered at the last step).

This module knows nothing of DeiT, Swin or ResNet: a family passes a `make_block(width, index, position)` callable.
Every step carries named sites (`HookPoint`s) for its inputs and output, see `models/sites.py`.

Gradient checkpointing (`StepsStack.set_grad_checkpointing`) checkpoints every block of every step, timm's way
(`timm.models.checkpoint_seq`): the step wiring (split, concatenation, sites) stays outside the checkpoints.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from timm.models import checkpoint_seq
from torch import nn

__all__ = ["HookPoint", "StepsStack", "as_dense", "step_widths", "check_step_widths", "width_multiple_error"]


class HookPoint(nn.Identity):
    """A named site in the forward pass. Returns its input; forward hooks on it read or replace the tensor."""


def check_step_widths(widths: Sequence[int], dim: int, multiple: int = 1) -> list[int]:
    """Validate cumulative step widths C_1 < ... < C_n = dim, each a positive multiple of `multiple`."""
    widths = [int(w) for w in widths]
    if not widths:
        raise ValueError("step widths are empty; allowed: at least one width, the last equal to the model width")
    if widths[-1] != dim:
        raise ValueError(f"step widths {widths} must end at the model width {dim}")
    bad = [w for w in widths if w <= 0 or w % multiple]
    if bad:
        raise ValueError(f"step widths {widths}: {bad} not a positive multiple of {multiple} "
                         f"(head dim / channel groups); allowed: multiples of {multiple}")
    if any(b <= a for a, b in zip(widths, widths[1:])):
        raise ValueError(f"step widths {widths} must strictly increase (every step adds fresh channels)")
    return widths


def step_widths(dim: int, num_steps: int, multiple: int = 1) -> list[int]:
    """Cumulative widths C_1..C_n for `num_steps` steps over a `dim`-wide stack.

    C_i = dim * 2^{-(n-i)/2}, rounded to the nearest multiple of `multiple` (the attention head dim, or the
    channel group size) so heads keep their dim. Raises ValueError when `dim` cannot be split that way.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}; allowed: an integer >= 1")
    if dim % multiple:
        raise ValueError(width_multiple_error(dim, multiple))
    widths = [max(multiple, int(round(dim * 2 ** (-(num_steps - i) / 2) / multiple)) * multiple)
              for i in range(1, num_steps + 1)]
    try:
        return check_step_widths(widths, dim, multiple)
    except ValueError:
        most = 1 + int(math.floor(2 * math.log2(dim / multiple)))  # steps before rounding collapses widths
        raise ValueError(f"cannot split width {dim} into {num_steps} narrow-to-wide steps of multiples of "
                         f"{multiple} (rounding gives {widths}); allowed: num_steps <= {max(1, most)} "
                         f"or a smaller head dim / group size") from None


def width_multiple_error(dim: int, multiple: int) -> str:
    return f"width {dim} is not divisible by head dim / group size {multiple}; allowed: multiples of {multiple}"


class Step(nn.Module):
    """One step i: concatenates y_{i-1} and x_i along channels and runs the blocks of F_i.

    Sites: `y_prev` (y_{i-1}, absent in the first step), `x` (the fresh channels x_i), `y` (the output y_i).
    """

    def __init__(self, blocks: Sequence[nn.Module], channel_dim: int, first: bool):
        super().__init__()
        self.channel_dim = channel_dim
        self.grad_checkpointing = False
        self.y_prev = None if first else HookPoint()
        self.x = HookPoint()
        self.blocks = nn.Sequential(*blocks)
        self.y = HookPoint()

    def forward(self, y_prev: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        x = self.x(x)
        # One concatenation per step is the only copy of the stream the scheme needs.
        h = x if y_prev is None else torch.cat([self.y_prev(y_prev), x], dim=self.channel_dim)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            h = checkpoint_seq(self.blocks, h)  # one checkpoint per block: backward recomputes one at a time
        else:
            h = self.blocks(h)
        return self.y(h)


class StepsStack(nn.Module):
    """A residual stack run step by step over channel groups.

    Args:
        widths: cumulative widths C_1 < ... < C_n (C_n is the stack's width).
        depths: number of blocks in each step.
        make_block: `make_block(width, index, position)` returns one block of the host family at `width`
            channels; `index` counts blocks across the whole stack (drop-path schedules), `position` counts
            them within the step (alternating shifted windows).
        channel_dim: the channel axis of the tensors (-1 for tokens / NHWC, 1 for NCHW feature maps).
    """

    def __init__(self, widths: Sequence[int], depths: Sequence[int],
                 make_block: Callable[[int, int, int], nn.Module], channel_dim: int = -1):
        super().__init__()
        widths = check_step_widths(widths, widths[-1] if widths else 0)
        if len(depths) != len(widths) or any(int(d) < 1 for d in depths):
            raise ValueError(f"step depths {list(depths)} must give >= 1 block for each of {len(widths)} steps")
        self.widths = list(widths)
        self.depths = [int(d) for d in depths]
        self.channel_dim = channel_dim
        self.in_width = self.widths[-1]  # the input's channels; stays when `truncate` drops the last steps
        self.split_sizes = self.group_sizes
        steps, index = [], 0
        for i, (width, depth) in enumerate(zip(self.widths, self.depths)):
            steps.append(Step([make_block(width, index + j, j) for j in range(depth)], channel_dim, first=i == 0))
            index += depth
        self.steps = nn.ModuleList(steps)

    @property
    def grad_checkpointing(self) -> bool:
        """Whether the blocks run under gradient checkpointing (see `set_grad_checkpointing`)."""
        return bool(self.steps) and all(step.grad_checkpointing for step in self.steps)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (recomputed in backward) instead of keeping its activations."""
        for step in self.steps:
            step.grad_checkpointing = enable

    def truncate(self, num_steps: int) -> None:
        """Keep the first `num_steps` steps (timm's `prune_intermediate_layers`). The input keeps its width;
        the channels of the dropped steps are split off and ignored, and the output is y_{num_steps}."""
        if not 1 <= num_steps <= len(self.steps):
            raise ValueError(f"num_steps={num_steps}; allowed: 1..{len(self.steps)}")
        self.steps = self.steps[:num_steps]
        self.widths, self.depths = self.widths[:num_steps], self.depths[:num_steps]
        rest = self.in_width - self.widths[-1]
        self.split_sizes = self.group_sizes + ([rest] if rest else [])

    @property
    def slow_width(self) -> int:
        """Channels of the output that belong to the slow path: [0, C_{n-1}). Zero for one step."""
        return self.widths[-2] if len(self.widths) > 1 else 0

    def block_modules(self) -> list[nn.Module]:
        """Every block, in execution order."""
        return [block for step in self.steps for block in step.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One split into views (its backward is one concatenation of the groups' gradients; a `narrow` per
        # step would instead zero-fill a full-width gradient per step and add them up). The first group goes
        # in as a dense copy: its blocks would copy the strided view anyway (LayerNorm, conv), once forward
        # and again in backward; later groups are copied by the step's one concatenation.
        groups = x.split(self.split_sizes, self.channel_dim)
        y = None
        for i, (step, x_i) in enumerate(zip(self.steps, groups)):
            y = step(y, as_dense(x_i) if i == 0 else x_i)
        return y

    def step_outputs(self, x: torch.Tensor, stop: Optional[int] = None) -> list[torch.Tensor]:
        """Outputs y_1.. of the steps 0..`stop` (all by default), as `forward` computes them."""
        groups = x.split(self.split_sizes, self.channel_dim)
        last = len(self.steps) - 1 if stop is None else stop
        y, outs = None, []
        for i, (step, x_i) in enumerate(zip(self.steps[:last + 1], groups)):
            y = step(y, as_dense(x_i) if i == 0 else x_i)
            outs.append(y)
        return outs

    @property
    def group_sizes(self) -> list[int]:
        """Channels d_i = C_i - C_{i-1} of each fresh group x_i."""
        return [b - a for a, b in zip([0] + self.widths[:-1], self.widths)]


def as_dense(t: torch.Tensor) -> torch.Tensor:
    """`t` as a dense tensor in its own memory layout (channels_last stays channels_last; a no-op if dense)."""
    if t.dim() == 4 and t.stride(1) == 1 and t.shape[1] > 1:  # a channel slice of an NHWC (channels_last) map
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()
