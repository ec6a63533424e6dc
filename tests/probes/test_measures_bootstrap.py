"""probes.measures.bootstrap_ci draws its resamples in blocks: the same resamples as one big array."""
from __future__ import annotations

import numpy as np


def test_bootstrap_in_blocks_draws_what_one_array_drew():
    from probes.measures import bootstrap_ci

    values = np.random.default_rng(3).random(5000)
    idx = np.random.default_rng([0, 19]).integers(0, len(values), (1000, len(values)))  # the old, one-array way
    means = values[idx].mean(1)
    assert bootstrap_ci(values) == (values.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5))
