"""The enumerated values the instruments accept, in one place and without importing torch.

The instruments import them from here, and so does the CLI (`click.Choice`, so `--help` lists them) while it
is still deciding whether the heavy imports are needed at all.
"""
from __future__ import annotations

POOLS: tuple[str, ...] = ("cls", "mean", "tokens")        # probes.features: pooling of a site's tokens / positions
DTYPES: tuple[str, ...] = ("float32", "float16")          # probes.features: cached feature dtype
PROBES: tuple[str, ...] = ("sklearn", "torch", "auto")    # probes.linear: probe backend (auto: torch)
LEVELS: tuple[str, ...] = ("coarse", "fine", "detail")    # probes.measures: label levels
METHODS: tuple[str, ...] = ("ig", "saliency", "gradshap", "deeplift", "occlusion")  # probes.attribution input maps
ATTRIBUTION_PATHS: tuple[str, ...] = ("slow", "fast", "both")                        # probes.attribution paths
ATTRIBUTION_LEVELS: tuple[str, ...] = ("fine", "coarse")                             # probes.attribution levels
ABLATIONS: tuple[str, ...] = ("zero", "mean", "resample")                            # probes.causal ablations
