# Two commands do all the set-up on a fresh Debian 12 / Python 3.11 machine:
#   make demo   install everything, write the demo betons, train the default job
#   make test   install everything, run the test suite (what CI runs)
# Both are idempotent: a second run reuses the venv and the data that are there.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APT_PACKAGES := build-essential pkg-config libopencv-dev libturbojpeg0-dev chromium

.PHONY: venv demo test test-fast apt clean-runs

venv: $(STAMP)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): requirements.txt pyproject.toml | apt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	grep -v '^ffcv==' requirements.txt > $(VENV)/requirements-deps.txt
	$(PY) -m pip install -q --disable-pip-version-check -r $(VENV)/requirements-deps.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $$(grep '^ffcv==' requirements.txt)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(PY) -c "import pipeline, ssal_models, ssal_datasets, ffcv.loader, ffcv.writer, cv2, torch, mlflow, submitit; print('venv ok: torch', torch.__version__, 'ffcv ok')"
	touch $(STAMP)

demo: venv
	$(PY) pipeline/launch.py --local --resume auto

test: venv
	$(PY) -m pytest -ra --durations=15

test-fast: venv
	$(PY) -m pytest -ra --durations=15 -m "not slow"

clean-runs:
	rm -rf runs
