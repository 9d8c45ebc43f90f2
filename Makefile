# The two commands: `make run` starts the cluster on the shipped config;
# `make test` installs the test dependencies and runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= conf/meshgate.yaml
PYTEST_ARGS ?=

.PHONY: run test install bench clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: setup.py cluster/_speedups.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: setup.py cluster/_speedups.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/meshgate start -c $(CONFIG)

test: $(VENV)/.installed-test browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Chromium for tests/test_browser.py, from Debian's packages. When it cannot be
# installed the test is skipped and says why; nothing else depends on it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for the browser test"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	      || echo "meshgate: chromium could not be installed; the browser test will be skipped"; \
	  else \
	    echo "meshgate: chromium is not installed and apt-get needs root; the browser test will be skipped"; \
	  fi; }

# meshgate against Nchan and a websockets baseline (bench/README.md); never part of `make test`.
# Nchan comes from Debian's nginx-light and libnginx-mod-nchan; when they cannot be installed the
# Nchan round is skipped and says why. Flags go through: make bench BENCH_ARGS="--subscribers 1000".
bench: $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@if [ -x /usr/sbin/nginx ] && [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing nginx-light and libnginx-mod-nchan for the Nchan round"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light libnginx-mod-nchan >/dev/null; } \
	    || echo "meshgate bench: nginx-light and libnginx-mod-nchan could not be installed; the Nchan round will be skipped"; \
	else \
	  echo "meshgate bench: Nchan is not installed and apt-get needs root; the Nchan round will be skipped"; \
	fi
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
