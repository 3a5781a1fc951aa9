# Quick start:  make test   (virtual environment with Python 3.11, CPU torch 2.13.0, requirements; a cached CPU ComfyUI
# of the newest and the oldest supported release; Chromium; then every test, unit, real-ComfyUI and browser alike)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test unit comfyui lint docs workflows generate

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-test.txt -c constraints.txt
	touch $@

# Stages and their times: scripts/run_tests.py. Extra pytest arguments: make test ARGS="-k sampler"
test:
	@start=$$(date +%s) && $(MAKE) --no-print-directory venv && \
	K5_VENV_SECONDS=$$(( $$(date +%s) - start )) $(BIN)/python scripts/run_tests.py $(ARGS)

# Only the unit tests (no ComfyUI server, no browser): the quick loop while editing kandinsky_core. The node tests
# import ComfyUI's comfy_api from COMFYUI_DIR or the cached runtime (`make comfyui`); without one they are skipped.
unit: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider tests --ignore=tests/integration

# A cached CPU ComfyUI runtime (.cache/comfyui/RELEASE/); prints COMFYUI_DIR and COMFYUI_PYTHON
comfyui: venv
	$(BIN)/python scripts/comfyui_runtime.py $(RELEASE)

lint: venv
	$(BIN)/ruff check .

docs: venv
	$(BIN)/python scripts/update_docs.py

# workflows/*.json and their .jpg thumbnails from the variants table, and their API twins in workflows/api/
workflows: venv
	$(BIN)/python scripts/make_workflows.py

# The main job: text-to-video with the distilled Lite model (downloads the weights it needs, ~25 GB, on first use).
PROMPT ?= a red fox running through fresh snow at golden hour, cinematic
VARIANT ?= t2v-lite-distilled16steps-5s
OUTPUT ?= out/kandinsky5.mp4
generate: venv
	@mkdir -p $(dir $(OUTPUT))
	$(BIN)/python -m kandinsky_core generate --variant $(VARIANT) --prompt "$(PROMPT)" --output $(OUTPUT) --overwrite
