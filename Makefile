# KD-OIQA. `make test` and `make demo` work on a fresh machine: they build the virtual
# environment first. VENV may point outside the clone (CI keeps it in ~/.cache).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdoiqa-installed
DEMO ?= demo
PYTEST_ARGS ?= -q

.PHONY: venv test demo reproduce lint clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

# The whole pipeline on CPU in small settings (see README). Outputs go to $(DEMO)/.
demo: $(STAMP)
	$(PY) demo.py --out $(DEMO)

# The paper's experiments on the databases under ./data (or DATA=...), both protocols; REPRODUCE_ARGS adds flags.
DATA ?= data
REPRODUCE_ARGS ?=
reproduce: $(STAMP)
	$(PY) reproduce.py --data-root $(DATA) $(REPRODUCE_ARGS)

clean-demo:
	rm -rf $(DEMO)
