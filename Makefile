# megagrow: two commands on a fresh machine (Python 3.11, g++, package registries):
#   make demo   - create .venv if missing, install, prepare the stdlib corpus, train the tiny plan on 2 CPU processes
#   make test   - create .venv if missing, install, run the test suite (make lint: ruff; make test-unit: a quick subset)
#   make stress - the reshard property test at 600 cases and 3x the fault-injection trials
#   make savings - the savings experiment and its report (docs/results/savings.md)
#   make data-manpages - a second corpus: the English man pages as text (apt-get installs groff + pages if groff is missing)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
DATA   := data_cache/stdlib
MANPAGES := data_cache/manpages
NPROC  ?= 2

export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS := 0
export PYTHONWARNINGS := ignore
export OMP_NUM_THREADS ?= 1

SAVINGS_DATA ?= $(DATA)
SAVINGS_OUT  ?= runs/savings

.PHONY: demo test test-unit lint stress install data data-manpages clean savings

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so nothing pulls a different build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

$(DATA).bin: $(STAMP)
	$(PY) tools/prepare_data.py --out $(DATA) --vocab-size 4096

data: $(DATA).bin

# English prose: /usr/share/man rendered by groff, one document per page (translations skipped);
# then: make savings SAVINGS_DATA=$(MANPAGES). The pages are those of the installed Debian packages
# (manpages + manpages-dev alone: ~1,100 pages, 2.3M tokens); --valid-fraction 0.03 holds out enough
# of them for the 32,768 validation tokens the savings experiment evaluates on (69k there)
$(MANPAGES).bin: $(STAMP)
	command -v groff >/dev/null || { apt-get update && apt-get install -y man-db manpages manpages-dev groff-base; }
	$(PY) tools/prepare_data.py --out $(MANPAGES) --input /usr/share/man --input-kind man --vocab-size 4096 \
	    --valid-fraction 0.03

data-manpages: $(MANPAGES).bin

demo: $(STAMP) $(DATA).bin
	# data prepared before validation splits existed: prepare it again (the tokenizer is reused)
	test -f $(DATA).valid.idx || $(PY) tools/prepare_data.py --out $(DATA) --vocab-size 4096
	rm -rf runs/tiny
	$(PY) -m megagrow.cli run recipes/tiny.yaml --run-dir runs/tiny
	$(PY) -m megagrow.cli status runs/tiny
	$(PY) -m megagrow.cli plot runs/tiny --out runs/tiny/loss.png
	@echo "checkpoints: runs/tiny/{small,wide,deep}/checkpoints (native DeepSpeed; zero_to_fp32.py inside)"
	@echo "logs:        runs/tiny/*/log.jsonl (+ TensorBoard events: tensorboard --logdir runs/tiny)"
	@echo "plot:        runs/tiny/loss.png (eval and training loss vs FLOPs)"

# the savings experiment (24 min measured from scratch on 2 quiet CPU cores; resumable: rerun to go on): staged runs vs from-scratch
# baselines at equal FLOPs, then docs/results/savings.md + .png from the logs.
# Another prepared corpus (with a validation split): make savings SAVINGS_DATA=data_cache/mydata
savings: $(STAMP) $(DATA).bin
	$(PY) tools/savings.py run --data $(SAVINGS_DATA) --out $(SAVINGS_OUT) --jobs 2; rc=$$?; \
	$(PY) tools/savings.py report --data $(SAVINGS_DATA) --out $(SAVINGS_OUT) --md docs/results/savings.md \
	    --png docs/results/savings.png && exit $$rc

test: $(STAMP)
	$(PY) -m pytest -q tests

# the quick subset (no multi-process launches, no Slurm cluster): a few minutes
test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not dist and not slurm and not slow" tests

# lint (ruff check) and the formatting check (ruff format --check), as .ci/run runs them
lint: $(STAMP)
	$(VENV)/bin/ruff check megagrow tests tools bench
	$(VENV)/bin/ruff format --check megagrow tests tools bench

# longer property and fault-injection runs (about 15 minutes on 2 cores): 600 reshard cases, 3x the kill trials
stress: $(STAMP)
	$(PY) -m pytest -q tests/dist/test_reshard_property.py --cases 600
	MEGAGROW_FAULT_TRIALS_SCALE=3 $(PY) -m pytest -q tests/dist/test_faults.py

clean:
	rm -rf runs build *.egg-info
