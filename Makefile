# Two commands on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# -qq: pip's errors still print; its notes about this machine's package mirrors do not.
PIP := $(BIN)/python -m pip -qq

.PHONY: demo test lint docs clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[all,dev,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/leukotree demo --out demo-out

# The browser test drives Debian's chromium (nothing is downloaded at test time).
chromium:
	@command -v chromium >/dev/null || (apt-get install -y -qq chromium >/dev/null 2>&1 \
	  || (apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null)) \
	  || (echo "The browser test needs Debian's chromium: apt-get install chromium" && false)

# The documentation site builds offline into site/ (git ignores it); --strict fails on any
# warning: a broken link, a missing API module, a results file that does not render.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: $(STAMP) chromium
	$(BIN)/ruff check src tests benchmarks docs/hooks
	$(BIN)/python -m pytest -q -n 2
	$(MKDOCS)

docs: $(STAMP)
	$(MKDOCS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs/hooks

clean:
	rm -rf $(VENV) demo-out site .pytest_cache .ruff_cache
