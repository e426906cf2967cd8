# One-command entry points (see README). Everything installs itself on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo oracle test test-quick lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) scripts/demo.py

# The oracle: qemu-img / qemu-io from Debian's qemu-utils.
oracle:
	@if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq qemu-utils >/dev/null; \
	fi
	@qemu-img --version | head -1

lint: install
	$(PY) -m ruff check src tests bench scripts
	$(PY) -m mypy src

# The whole suite, as CI runs it.
test: oracle install lint
	$(PY) -m pytest -q -n 2 tests

# A quicker subset for iterating: unit, property and CLI tests.
test-quick: install
	$(PY) -m pytest -q -x tests/unit tests/property tests/cli

bench: oracle install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
