# Two entry points: `make tour` (set up, then run the main job on CPU) and
# `make test` (set up, then run the test suite). Both create .venv from the
# pinned versions in requirements.lock; `make test-latest` tries the newest
# releases instead, in .venv-latest.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: setup tour test test-latest bench docs docs-check lock clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

tour: setup
	JAX_PLATFORMS=cpu $(PY) experiments/tour.py $(ARGS)

# The whole suite in float32, then the closed-form `numerics` tests again in float64 with tightened
# tolerances: the formula files, and the forward jet's rule tables. Tests that compare two routes to the same
# number (chunked or not, folded or not, an image or its flattened twin), and those limited by an ODE
# solver's or a Monte Carlo error (likelihood, flow solvers' orders, AIS), run in float32 only.
X64_FILES = tests/test_targets.py tests/test_sde.py tests/test_diffusion_formulas.py tests/test_ebm_formulas.py \
	tests/test_metrics.py tests/test_scores.py tests/test_diagnostics.py tests/test_forward.py \
	tests/test_hessian_diagonal.py tests/test_first_layer_seed.py
X64_SKIP = seeds_the_first_layer or rank_deficient_first_layer or identity_seed or folded or chunked or image or Image or folx or networks
# JAX's persistent compilation cache, shared by the workers and the passes (and kept between local runs):
# the same program built by several tests (a new lambda, the same HLO) compiles once. 11% off a fresh run.
TEST_ENV = JAX_PLATFORMS=cpu JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.jax_cache \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
test: setup
	$(TEST_ENV) $(PY) -m pytest -q -n auto --dist loadfile --durations=15 $(ARGS)
	$(TEST_ENV) JAX_ENABLE_X64=1 $(PY) -m pytest -q -n auto --dist loadfile -m numerics \
		-k "not ($(X64_SKIP))" $(X64_FILES) $(ARGS)

# The documentation site, offline, into docs/_build/html: the API from the docstrings and the tutorials,
# executed (cached in docs/_build/.jupyter_cache: a page runs again only when its code changed). Any
# warning, or a cell that raises, fails the build. `docs-check` then opens every page in headless
# Chromium (Debian's package: `apt-get install chromium`) and fails on a page that does not load, a
# console error, a formula MathJax did not typeset or a missing figure.
docs: setup
	JAX_PLATFORMS=cpu $(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
docs-check: docs
	$(PY) docs/check.py docs/_build/html

# Benchmarks print a table and write JSON under runs/bench/. The peers (folx, blackjax) are in the
# lock (the `peers` extra), so the tests and benchmarks compare against pinned versions.
bench: setup
	$(PY) experiments/bench/trace_cost.py $(ARGS)
	$(PY) experiments/bench/chain_throughput.py $(ARGS)
	$(PY) experiments/bench/likelihood_cost.py $(ARGS)

test-latest:
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet --upgrade -e ".[dev,peers]"
	$(TEST_ENV) .venv-latest/bin/python -m pytest -q -n auto --dist loadfile $(ARGS)

# Re-pin requirements.lock, with every file's sha256, from the newest releases that satisfy
# pyproject.toml (pip-tools; the install above then refuses any file whose hash differs).
# `make lock UPGRADE=` keeps the present pins and only adds what pyproject newly asks for.
UPGRADE ?= --upgrade
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet "pip-tools==7.6.2"
	.venv-lock/bin/pip-compile --quiet $(UPGRADE) --generate-hashes --allow-unsafe --no-strip-extras \
		--no-emit-index-url --no-emit-find-links --extra dev --extra peers --extra data --extra docs \
		--output-file requirements.lock pyproject.toml
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-latest runs .pytest_cache .jax_cache docs/_build
