# Two entry points: `make run` (daemon on the starter model + a prediction) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv venv-device test test-fast lint run link format bench clean

# Device side only: serve, train, predict (no torch).
$(BIN)/keyboard: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

venv-device: $(BIN)/keyboard

# Everything: export extra (torch CPU first, so no resolver ever reaches for CUDA wheels), dev
# tools, and the federated extra (Flower; Python >= 3.11).
$(VENV)/.full: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[export,dev,federated]"
	touch $@

venv: $(VENV)/.full
	@command -v nvim >/dev/null || echo "note: nvim not found, so tests/test_nvim.py is skipped (install Neovim >= 0.10 to run it)"

# The main job: the daemon on the shipped starter model (background; `keyboard stop` ends it),
# then one prediction through its socket.
run: venv-device
	@$(BIN)/keyboard status >/dev/null 2>&1 || $(BIN)/keyboard serve
	$(BIN)/keyboard predict "Thank you for your "

# `keyboard` on PATH: a link in ~/.local/bin to .venv/bin/keyboard.
link: venv-device
	$(BIN)/keyboard link

test: venv
	$(BIN)/ruff check wordahead tests scripts benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -ra

# The torch-free tests alone (no model export): seconds, for the edit-test loop.
test-fast: venv
	$(BIN)/python -m pytest -q -m notorch

lint: venv
	$(BIN)/ruff check wordahead tests scripts benchmarks
	$(BIN)/ruff format --check wordahead tests scripts benchmarks

format: venv
	$(BIN)/ruff format wordahead tests scripts benchmarks
	$(BIN)/ruff check --fix wordahead tests scripts benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
