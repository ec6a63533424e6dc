"""The StepsNet scheme against hand-written equations, and its width schedule."""
import math

import pytest
import torch
from torch import nn

from models.steps import StepsStack, check_step_widths, step_widths


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def make_block(width, index, position):
    return Residual(width)


def test_two_steps_match_the_equation():
    torch.manual_seed(0)
    stack = StepsStack([3, 8], [1, 1], make_block)
    x = torch.randn(4, 6, 8)
    f1, f2 = stack.steps[0].blocks[0], stack.steps[1].blocks[0]
    expected = f2(torch.cat([f1(x[..., :3]), x[..., 3:]], dim=-1))
    torch.testing.assert_close(stack(x), expected)


def test_n_steps_recurse_with_channels_first():
    torch.manual_seed(0)
    conv = lambda w, i, p: nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU())  # noqa: E731
    stack = StepsStack([2, 4, 7, 10], [2, 1, 1, 2], conv, channel_dim=1)
    x = torch.randn(2, 10, 5, 5)
    y, start = None, 0
    for step, width in zip(stack.steps, stack.widths):
        h = x[:, start:width]
        h = h if y is None else torch.cat([y, h], dim=1)
        for block in step.blocks:
            h = block(h)
        y, start = h, width
    torch.testing.assert_close(stack(x), y)
    assert stack.slow_width == 7


def test_block_index_and_position_reach_make_block():
    seen = []
    StepsStack([2, 4], [3, 2], lambda w, i, p: seen.append((w, i, p)) or nn.Identity())
    assert seen == [(2, 0, 0), (2, 1, 1), (2, 2, 2), (4, 3, 0), (4, 4, 1)]


@pytest.mark.parametrize("dim,n,multiple", [(384, 4, 64), (768, 4, 64), (96, 2, 32), (768, 4, 32),
                                            (2048, 4, 64), (512, 4, 16), (100, 3, 1)])
def test_width_schedule_is_narrow_to_wide(dim, n, multiple):
    widths = step_widths(dim, n, multiple)
    assert len(widths) == n and widths[-1] == dim
    groups = [b - a for a, b in zip([0] + widths, widths)]
    assert sum(groups) == dim and all(g > 0 for g in groups)
    assert all(w % multiple == 0 for w in widths)
    for a, b in zip(widths, widths[1:]):
        assert a < b
        # rounding to whole heads moves a width by at most half a head from C_{i+1}/sqrt(2)
        assert abs(a - dim * 2 ** (-(n - widths.index(a) - 1) / 2)) <= multiple / 2 + 1e-9


def test_schedule_errors_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"cannot split width 64 into 8 .*allowed: num_steps <= "):
        step_widths(64, 8, 32)
    with pytest.raises(ValueError, match=r"width 100 is not divisible by head dim / group size 64"):
        step_widths(100, 2, 64)
    with pytest.raises(ValueError, match=r"must strictly increase"):
        check_step_widths([64, 64, 128], 128, 32)
    with pytest.raises(ValueError, match=r"\[48\] not a positive multiple of 32"):
        check_step_widths([48, 128], 128, 32)
    with pytest.raises(ValueError, match=r"num_steps=0"):
        step_widths(128, 0)
    with pytest.raises(ValueError, match=r">= 1 block for each of 2 steps"):
        StepsStack([2, 4], [1, 0], make_block)
