# Two commands on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# -qq: pip's errors still print; its notes about this machine's package mirrors do not.
PIP := $(BIN)/python -m pip -qq

.PHONY: demo test lint clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/leukotree demo --out demo-out

# The browser test drives Debian's chromium (nothing is downloaded at test time).
chromium:
	@command -v chromium >/dev/null || (apt-get install -y -qq chromium >/dev/null 2>&1 \
	  || (apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null)) \
	  || (echo "The browser test needs Debian's chromium: apt-get install chromium" && false)

test: $(STAMP) chromium
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
