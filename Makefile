# EchoTune: `make demo` runs the whole system, `make test` runs the tests.
# Both create .venv (Python 3.11+) and install the project into it when needed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled

.PHONY: demo test stop bench install clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m deployments.demo --config ray_config.yaml

stop: $(STAMP)
	$(PY) -m deployments.demo stop --config ray_config.yaml

test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The web tests drive Debian's chromium through Playwright (never a downloaded browser).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; \
	else echo "no /usr/bin/chromium and no apt-get: the browser tests will be skipped"; fi

bench: $(STAMP)
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
