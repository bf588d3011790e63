# Two commands on a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# pytest arguments, e.g. `make test PYTEST_ARGS="-k metrics"`
PYTEST_ARGS ?=
QUICKSTART_DIR ?= .quickstart
# Installed before the project so that `torch>=2.4` is already met: 2.13.0 is the CPU build these
# machines keep on disk (a bare `torch` would resolve to a multi-GB CUDA build). Elsewhere, override:
# `make install TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test install-bench browser postgres run test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH_SPEC)"

# Stamps make re-runs instant; they are rebuilt whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[bench]'
	touch $@ $(VENV)/.installed

install-bench: $(VENV)/.installed-bench

run: install
	$(BIN)/recsys quickstart --out $(QUICKSTART_DIR)

# The explorer page's browser test drives Debian's Chromium (never a downloaded browser). Installed
# when missing and we may (root with apt-get); otherwise that one test skips with the reason.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

# The shared feedback log's tests start a real PostgreSQL server (tests/postgres_server.py):
# Debian's server package, installed when no initdb is found and we may (root with apt-get);
# otherwise those tests skip with the reason.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null \
		&& [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi

# pytest exits 5 when a filter selects no test: that is not a failure of the suite.
test: install-test browser postgres
	$(BIN)/python -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The benchmarks' own extra (pyproject.toml [bench]): a fresh clone runs them without the tests'.
bench: install-bench
	$(BIN)/python -m benchmarks.run

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/mypy data retrieval ranking reranking pipeline serving evaluation experiments cli benchmarks

clean:
	rm -rf $(QUICKSTART_DIR) .pytest_cache build *.egg-info
