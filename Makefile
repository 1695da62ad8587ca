# Strata: every target sets up what it needs first (idempotent, seconds when already done).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STRATA := $(VENV)/bin/strata
PYTEST_ARGS ?=

.PHONY: setup cluster cluster-stop demo test test-fast bench doctor clean

setup:  ## apt packages, virtual environment, pinned deps, Horovod built from source
	@bash .ci/setup.sh

demo: setup  ## train the default config with 2 data-parallel Horovod workers, then show test metrics
	$(STRATA) launch -np 2 configs/classifier.yaml
	$(STRATA) evaluate runs/classifier --split test
	$(STRATA) classify runs/classifier "the room was lovely and the staff friendly . we arrived on monday" \
		"the breakfast was stale and the waiter rude . my sister ordered the soup"

cluster:  ## a real single-node SLURM cluster on this machine (munge, slurmctld, slurmd); idempotent
	@bash slurm/local-cluster.sh start

cluster-stop:
	@bash slurm/local-cluster.sh stop

test: setup cluster  ## the whole test suite (what CI runs), including real sbatch jobs
	$(PY) -m pytest -q -ra --durations=25 $(PYTEST_ARGS) tests

test-fast: setup  ## unit tests only
	$(PY) -m pytest -q -ra -m "not slow and not multi_process and not cluster" tests

bench: setup  ## the benchmarks in the README's table (minutes; run on a quiet machine)
	$(PY) bench/overhead.py
	$(PY) bench/overhead.py --model summarizer --steps 150
	$(PY) bench/scaling.py
	$(PY) bench/allreduce.py
	$(PY) bench/pipeline.py --batch 128 --steps 8
	$(PY) bench/preemption.py --repeats 2 --steps 300
	$(PY) bench/mfu.py
	$(PY) bench/attention.py

doctor: setup
	$(STRATA) doctor

clean:
	rm -rf runs .pytest_cache
