"""Performance bench: every Steps model against its baseline at matched MACs, on the device at hand.

    python -m experiments.bench [--device auto|cpu|cuda] [--quick] [--out DIR] [--models NAMES] [--repeats N]
                                [--budget-s S] [--compile] [--cuda-graphs] ...          (`make bench`; --help)

Every figure is a ratio against a reference measured in the same process: the two sides run interleaved, in
alternating order per round (A B, B A, ...), `--repeats` rounds, and a ratio is the median of the per-round
ratios (min and max beside it). On a shared CPU only such ratios mean anything; absolute images/s are reported
but move with the machine's load. On CPU the ratios of process CPU time are reported too: they are less
sensitive to other processes than wall time and show how much of a wall-time ratio is contention.

Default models: the micro pairs (28 px grey, batch 128, fp32) on CPU; the 224 px pairs (batch 128, bf16 autocast,
channels_last for ResNets, cudnn.benchmark) on CUDA. Attention is timm's default: DeiT runs the fused
F.scaled_dot_product_attention; timm's Swin keeps its unfused window attention (timm marks fused Swin attention
experimental; TIMM_FUSED_ATTN=2 in the environment switches it on for both Swin models).

Modules: harness (Setup, interleaved timing, device helpers, building a pair), machine (matmul peak, CPU
contention), one module per section, each saying what it measures (throughput, overhead, paths, profile, graphs:
run on each pair; probe, attribution, compiled (the compile section): run once), run (the table of sections and
one run), report (Markdown, targets, MFU, MLflow metric names), cli. Each section is guarded: a failure or a
missing optional package becomes a note, the rest still runs; the JSON and Markdown are rewritten after every
section, so a run stopped early still leaves its results.

Outputs: <out>/bench-<device>.json and .md (``bench-<device>-<tag>.*`` with `--tag`), device = ``cpu-<n>cores``
or the CUDA card name, lower-case with dashes (``nvidia-h100-80gb-hbm3``), and an MLflow run of kind ``bench``.

Optional packages are imported on use: mlflow (tracking; `--no-track` skips it), captum (attribution),
scikit-learn (probe). Without one, its part is skipped with a printed note, so the bench runs where only torch,
timm and numpy are installed. `--budget-s` caps the whole run: a pair or section that would not fit is skipped
with a note.
"""
import os

# As experiments/train.py: idle OpenMP threads sleep instead of spinning (a shared CPU). Before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
