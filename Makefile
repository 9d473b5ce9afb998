# flowbook: `make setup && make lab` to teach, `make setup && make test` to check everything, `make setup && make nbgrader` to grade.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.py))

.PHONY: setup lab test test-unit test-notebooks test-gpu sync outputs html student solutions nbgrader bench train-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet "pip>=23"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

lab: setup
	$(BIN)/jupyter lab notebooks/

# Unit tests and every chapter under nbval, in quick mode unless FLOWBOOK_MODE says otherwise. JOBS test
# processes side by side, one thread each; a file's tests run in one of them (a notebook in one kernel), the files
# handed out in the order given (--no-loadscope-reorder: pytest-xdist would otherwise hand out the files with the
# most tests first, and the one-test student editions last). LONGEST lists the files that take half a minute or
# more, about longest first (measured with --durations=0 on 2 cores; chapter 3's nbval run and its student
# edition far apart, as both train the chapter's demonstration models under one lock), so that no long file
# starts last while the other process sits idle; the rest follow.
JOBS ?= 2
LONGEST := tests/test_student_edition_2.py tests/test_student_edition_1.py tests/test_train.py \
	notebooks/07_continuous_time.ipynb tests/test_exercises.py tests/test_student_edition_3.py tests/test_distributed.py \
	tests/test_student_edition_5.py notebooks/03_coupling_layers.ipynb notebooks/05_analysis.ipynb \
	tests/test_student_edition_4.py notebooks/06_beyond_realnvp.ipynb notebooks/02_dequantization.ipynb \
	tests/test_tools.py tests/test_grading.py notebooks/04_multiscale.ipynb notebooks/08_transformer_flows.ipynb
# Every file named once: pytest keeps the order of the command line only where no argument contains another.
TEST_FILES := $(LONGEST) $(filter-out $(LONGEST),$(wildcard notebooks/[0-9][0-9]_*.ipynb) $(sort $(wildcard tests/test_*.py)))
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder $(TEST_FILES) --nbval-lax --durations=15

test-unit: setup
	$(BIN)/python -m pytest tests

test-notebooks: setup
	$(BIN)/python -m pytest notebooks --nbval-lax --durations=0

# On a GPU machine: every chapter in full mode (uses the checkpoints in checkpoints/ where present).
test-gpu: setup
	FLOWBOOK_MODE=full $(BIN)/python -m pytest notebooks --nbval-lax --durations=0

sync: setup
	$(BIN)/jupytext --sync $(NOTEBOOKS)

# Run every chapter (quick mode, shipped checkpoints) and store its outputs in the .ipynb for readers.
outputs: setup
	$(BIN)/python -m flowbook.outputs

# The chapters as static HTML with their stored outputs, maths rendered offline: book/index.html.
html: setup
	$(BIN)/python -m flowbook.book

# A notebook a student changed is never overwritten (the new version goes beside it); FORCE=1 overwrites.
student: setup
	$(BIN)/python -m flowbook.editions student $(if $(FORCE),--force)

solutions: setup
	$(BIN)/python -m flowbook.editions solutions $(if $(FORCE),--force)

# The chapters as an nbgrader course in grading/ (source/<chapter>/<chapter>.ipynb, nbgrader_config.py), each
# checked as nbgrader will release it; see docs/teaching.md. Never touches the gradebook, release/, submitted/,
# autograded/ or feedback/; a notebook or config the lecturer changed is kept (new version in grading/new/),
# FORCE=1 overwrites.
nbgrader: setup
	$(BIN)/python -m flowbook.grading $(if $(FORCE),--force)

bench: setup
	$(BIN)/python -m flowbook.bench

# Train four models into runs/<model>/ with the CLI defaults and evaluate each (a killed run continues where it
# stopped; docs/training.md has the recipes of the shipped checkpoints).
# On a CPU give each run a budget and the CPU settings:
# `make train-all MINUTES=90 TRAIN_ARGS="--batch-size 64 --lr 3e-3 --warmup-steps 100"` (see docs/training.md).
MINUTES ?=
TRAIN_ARGS ?=
train-all: setup
	for m in simple vardeq multiscale glow; do \
	  $(BIN)/python -m flowbook.train --model $$m --out runs/$$m $$([ -f runs/$$m/last.ckpt ] && echo --resume) \
	    $(if $(MINUTES),--max-minutes $(MINUTES)) $(TRAIN_ARGS) && \
	  $(BIN)/python -m flowbook.evaluate --checkpoint runs/$$m/$$m.pt || exit 1; done

# Generated editions only: training runs in runs/ are results, never cleaned.
clean:
	rm -rf student solutions answers book .pytest_cache
