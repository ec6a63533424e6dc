"""StepsLab jobs: what you run and record (the `probe` CLI, training, probe runs, attribution, studies, bench).

Importing this package first sets OMP_WAIT_POLICY=PASSIVE (an explicit setting wins), before any job loads torch:
idle OpenMP threads then sleep instead of spinning, and on a CPU shared with other work torch's many small ops
run several times faster (a probe fit on 2 busy cores: 50-63 s spinning, 16 s passive).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
