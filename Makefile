# Developer commands. `make check` is what to run before a commit: lint, the import graph, the fast tests.
PYTHON ?= .venv/bin/python
# The fast tier: no DeepSpeed engine, no launcher, no Prefect server (seconds; one tiny model build).
FAST_TESTS = tests/test_losses.py tests/test_truncation.py tests/test_schedule.py tests/test_config.py \
             tests/test_trl_keys.py tests/test_artifacts.py tests/test_mix.py tests/test_plan.py tests/test_logprobs.py

.PHONY: check lint fmt types imports test-fast test

check: lint types imports test-fast

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

fmt:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

types:
	$(PYTHON) -m mypy

imports:
	$(PYTHON) .ci/import_graph.py

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" $(FAST_TESTS)

test:
	$(PYTHON) -m pytest -q
