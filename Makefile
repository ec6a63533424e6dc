# StepsLab. `make demo` sets up and runs the main job; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROBE := $(VENV)/bin/probe
FASHION_MNIST := /usr/share/datasets/fashion-mnist
WORDNET := /usr/share/wordnet
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data test demo bench figures figures-data ui clean

setup: $(VENV)/.installed data

# torch+torchvision first (pip takes them from local disk), then everything else constrained to them.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]" -c constraints.txt
	touch $@

# The embedded default dataset: Fashion-MNIST from Debian's package (original IDX files, MIT); WordNet 3.0
# (Debian's wordnet-base) for ImageNet's coarse labels (experiments/wordnet.py).
data:
	@test -d $(FASHION_MNIST) || { $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; }; }
	@test -d $(FASHION_MNIST) && echo "Fashion-MNIST: $(FASHION_MNIST)"
	@test -f $(WORDNET)/data.noun || { $(SUDO) apt-get install -y -q wordnet-base >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q wordnet-base >/dev/null; }; }
	@test -f $(WORDNET)/data.noun && echo "WordNet 3.0: $(WORDNET)"

test: setup
	$(PY) -m pytest

demo: setup
	$(PROBE) demo

bench: setup
	$(PY) -m experiments.bench

# The small CPU experiments behind every figure, then every figure from the recorded runs.
# `probe figures` alone redraws from runs already recorded (same runs in, same bytes out).
figures: figures-data
	$(PROBE) figures

# Each of these makes new MLflow runs; GPU-scale versions: experiments/configs/figures.md.
figures-data: setup
	$(PROBE) study shortcut
	$(PROBE) study degradation
	$(PROBE) study gradients
	$(PROBE) demo
	$(PROBE) run --model steps_deit_micro --layers all
	$(PROBE) run --model deit_micro --layers all
	$(PROBE) attribute --model steps_deit_micro
	$(PY) -m experiments.bench

ui: setup
	$(PROBE) ui

clean:
	rm -rf $(VENV) build *.egg-info
