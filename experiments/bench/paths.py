"""paths: `models.sites.forward_paths` of every path (slow_path, fast_path, final, each step's y) in one pass
vs plain `model.forward`."""
from __future__ import annotations

import re

import torch
from torch import nn

from experiments.bench.harness import Pair, Setup, batch_for, inferer, interleave, log
from experiments.bench.report import rng
from models.sites import forward_paths, site_names
from probes.runtime import autocast

PATH_Y = re.compile(r"stages\.\d+\.steps\.\d+\.y")


def path_names(model: nn.Module) -> list[str]:
    """slow_path, fast_path, final and every step's output y."""
    return ["slow_path", "fast_path", "final"] + [n for n in site_names(model) if PATH_Y.fullmatch(n)]


def run(pair: Pair, setup: Setup) -> dict:
    """forward_paths (all paths) images/s vs forward images/s of the pair's Steps model."""
    model, device = pair.steps.model.eval(), setup.device
    x, _ = batch_for(pair.steps, setup)
    names = path_names(model)

    def paths():
        with torch.inference_mode(), autocast(device):
            return forward_paths(model, x, names)

    t = interleave({"forward": inferer(model, x, device), "paths": paths}, setup, repeats=setup.repeats_secondary)
    res = {"model": pair.steps.name, "paths": names, "forward_ips": t.ips("forward", len(x)),
           "paths_ips": t.ips("paths", len(x)), "ratio": t.ratio("paths", "forward")}
    log(f"paths {pair.steps.name}: {rng(res['ratio'])} ({len(names)} paths)")
    return res
