"""StepsLab probes: features once (`probes.features`), linear probes (`probes.linear`), measures
(`probes.measures`: MDL, equal-width controls, division of labour) and the `probe run` pipeline (`probes.run`).

`probes.run` imports MLflow on use only; importing this package stays light.
"""
from .features import extract, feature_names, feature_specs  # noqa: F401
from .linear import fit_probe  # noqa: F401
from .measures import division_of_labour, prequential_mdl  # noqa: F401
