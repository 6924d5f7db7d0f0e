# Quickstart: `make demo` runs the main job, `make test` runs the tests. Both create .venv with pinned versions.
PY := .venv/bin/python
STAMP := .venv/.installed

# The code reward's sandbox (nanoseek/rl/sandbox.py) needs bubblewrap: installed when missing and apt is usable as root.
$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null 2>&1; } || true
	python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

.PHONY: demo test lint bench balancing install test-lmeval test-browser test-llama test-slow
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m nanoseek speedrun --out runs/speedrun --overwrite

test: $(STAMP)
	$(PY) -m ruff check nanoseek tests benchmarks
	$(PY) -m pytest -q

# The long tests left out of `make test` to keep it under 15 minutes on 2 cores (marker `slow`).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check nanoseek tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_pretrain.py

balancing: $(STAMP)
	$(PY) benchmarks/balancing_study.py

# lm-evaluation-harness (a heavy install, so not in the default suite): installs it beside the pinned packages,
# then runs the adapter's tests (real lm-eval on local task files).
test-lmeval: $(STAMP)
	$(PY) -m pip install -q -r requirements-lmeval.txt -c requirements.txt
	$(PY) -m pytest -q -m lmeval tests/eval

# The chat page in a real headless Chromium: Debian's chromium (installed when missing and apt is usable as root;
# playwright drives the system browser, so nothing is downloaded at test time), then the browser tests.
test-browser: $(STAMP)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || true
	$(PY) -m pip install -q -r requirements-browser.txt -c requirements.txt
	$(PY) -m pytest -q -m browser tests/infer

# GGUF exports checked against llama.cpp: llama-cpp-python built from source (a long compile on 2 cores: 45 minutes
# beside other jobs; the bindings only, no tools or multimodal library), then its tests print the parity numbers (BENCHMARKS.md).
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF
test-llama: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip install -q --no-binary llama-cpp-python -r requirements-llama.txt \
		-c requirements.txt
	$(PY) -m pytest -q -s -m llama tests/io
