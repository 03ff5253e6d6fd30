# Two commands on a fresh machine: `make train` and `make test` (each does `make setup` first).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
DATA    ?= data/default
NPROC   ?= 2
CONFIG  ?= configs/tiny.yaml
DS_CONFIG ?= ds_configs/zero2.json
PYTEST_ARGS ?= --durations=30
# the training entry point, named once, in trainer/launch.py
ENTRY   := $(shell sed -n 's/^ENTRY = "\([^"]*\)".*/\1/p' trainer/launch.py)
# the whole suite on two pytest-xdist workers; a file, or the files sharing a session-wide run,
# stay on one worker (tests/conftest.py). TEST_WORKERS=0: one process, in order. docs/testing.md
TEST_WORKERS ?= 2

.PHONY: setup train test test-fast bench reproduce clean-venv

setup: $(VENV)/.installed $(DATA)/meta.json

# torch first (pinned; see README for CUDA clusters), then everything but DeepSpeed,
# then DeepSpeed without build isolation so its setup.py sees the torch we installed
# instead of pulling a CUDA build into an isolated build environment.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $$(grep -E '^torch==' requirements.txt)
	grep -vE '^(deepspeed|torch)==' requirements.txt > $(VENV)/requirements.rest.txt
	$(PIP) install -q -r $(VENV)/requirements.rest.txt
	$(PIP) install -q --no-build-isolation $$(grep -E '^deepspeed==' requirements.txt)
	touch $@

# The embedded default corpus: the running Python's standard library (no download).
$(DATA)/meta.json: $(VENV)/.installed
	$(PY) -m trainer.data prepare --out $(DATA)

# The tiny preset on the embedded corpus, NPROC processes through DeepSpeed's launcher (gloo on CPU).
train: setup
	$(VENV)/bin/deepspeed --num_gpus $(NPROC) $(ENTRY) --ds_config $(DS_CONFIG) --config $(CONFIG) $(OVERRIDES)

test: setup
	$(PY) -m pytest tests $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS)

# Everyday edits: the tests that start no other process (no training run, no gloo ranks, no CLI).
test-fast: setup
	$(PY) -m pytest tests -m "not multiproc" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/moe_layer.py --json bench_out/moe_layer.json

# The paper's comparisons at the tiny scale (9 arms x 2 seeds, ~30 min on an idle 2-core CPU);
# report in runs/reproduce-tiny/report/report.md. REPRODUCE_ARGS="--dry-run" prints the plan only.
reproduce: setup
	$(PY) -m evaluation.reproduce --scale tiny $(REPRODUCE_ARGS)
