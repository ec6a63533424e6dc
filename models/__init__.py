"""StepsLab models: StepsNet over DeiT, Swin and ResNet, and short names for their timm baselines.

Importing this package registers every model in timm: `timm.create_model("steps_deit_b")`.
"""
from . import baselines, steps_deit, steps_resnet, steps_swin  # noqa: F401  (register the models in timm)
from .registry import MODELS, BASELINE_OF, create_model, family_of, is_steps  # noqa: F401
from .sites import forward_paths, intervene, path_split, site_names  # noqa: F401
from .steps import StepsStack, step_widths  # noqa: F401
