# Quickstart: `make demo` runs the main job, `make test` runs the tests. Both create .venv with pinned versions.
PY := .venv/bin/python
STAMP := .venv/.installed

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

.PHONY: demo test lint bench balancing install
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m nanoseek speedrun --out runs/speedrun

test: $(STAMP)
	$(PY) -m ruff check nanoseek tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check nanoseek tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_pretrain.py

balancing: $(STAMP)
	$(PY) benchmarks/balancing_study.py
