"""StepsLab probes: instruments on frozen models. Each takes a model and tensors (or `LabeledImages`) and returns
results; none loads a dataset, logs to MLflow or prints. Features once (`probes.features`), linear probes
(`probes.linear`), measures (`probes.measures`: MDL, equal-width controls, division of labour), attribution
(`probes.attribution`) and causal tests (`probes.causal`); `probes.runtime` holds what the jobs in
`experiments/` share with them (the labelled-image container, batching, device, autocast).
"""
from __future__ import annotations

import importlib

# Loaded on first use, so `probes.choices` (read by the CLI before it decides to import torch) stays light.
_LAZY = {"extract": "features", "feature_names": "features", "feature_specs": "features", "fit_probe": "linear",
         "division_of_labour": "measures", "prequential_mdl": "measures"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'probes' has no attribute {name!r}")
    return getattr(importlib.import_module(f"probes.{_LAZY[name]}"), name)
