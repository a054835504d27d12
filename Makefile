# Every target provisions what it needs (a venv, ComfyUI 0.3.75, seeded models) under
# $(MEMKIT_HOME) (default ~/.cache/comfyui-memkit) and reuses it on the next run.
# COMFYUI_PATH=/path/to/ComfyUI uses your own ComfyUI; MEMKIT_PYTHON=/path/to/python your own env.
PYTHON ?= python3
HOST := $(PYTHON) scripts/host.py
PORT ?= 8188

.PHONY: run test test-fast bench lint setup workflows

run:        ## start ComfyUI with this package and demo models on 127.0.0.1:$(PORT)
	$(HOST) run --port $(PORT)

test:       ## lint + every test (unit, in-process, end-to-end through a real server)
	$(HOST) test

test-fast:  ## lint + the tests not marked slow
	$(HOST) test --fast

bench:      ## benchmarks; writes BENCHMARKS.md (ONLY="vae" or ONLY="cache" runs one section)
	$(HOST) bench $(ONLY)

workflows:  ## export workflows/*.json (UI) to workflows/api/ (API) with the page of `make run` on $(PORT), in Chromium
	$(HOST) workflows --port $(PORT)

lint:
	$(HOST) python -m ruff check .

setup:
	$(HOST) setup
