# captchaops: `make demo` and `make test` are all a newcomer needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock

.PHONY: venv install lock demo test bench lint format clean down

venv: $(BIN)/python

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the dependency list or the lock changes. The lock pins every package
# (pip constraints), so two installs on two days get the same versions.
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Refresh the lock after changing pyproject.toml's dependencies: resolve them afresh in a
# throwaway venv (newest versions the ranges allow) and freeze what it installed.
lock:
	rm -rf $(VENV)-lock
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install --quiet --upgrade pip
	$(VENV)-lock/bin/pip install --quiet -e ".[dev]"
	{ echo "# pip constraints for make install, the images and CD; refresh with: make lock"; \
	  $(VENV)-lock/bin/pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(VENV)-lock

demo: install
	$(BIN)/captchaops demo

down:
	$(BIN)/captchaops down

# Checked before anything is installed: the browser test drives Debian's chromium
# (.ci/run installs it).
ifneq ($(filter test,$(MAKECMDGOALS)),)
ifeq ($(shell command -v chromium),)
$(error make test needs Chromium: apt-get install chromium)
endif
endif

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks harness
	$(BIN)/ruff format --check src tests benchmarks harness
	$(BIN)/mypy src harness

format: install
	$(BIN)/ruff format src tests benchmarks harness
	$(BIN)/ruff check --fix src tests benchmarks harness

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
