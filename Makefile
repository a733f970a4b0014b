# i2v — `make run` starts everything, `make test` runs the whole suite. Both install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: run test test-long install install-dev bench bench-scheduler bench-dispatch bench-load clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt $(VENV)/.runtime
	$(PIP) install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

run: $(VENV)/.runtime
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v 0
	$(PY) manage.py bootstrap
	$(PY) manage.py runall

test: $(VENV)/.dev
	@# The browser tests drive Debian's Chromium; never `playwright install` (it downloads its own build).
	test -x /usr/bin/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest $(PYTEST_ARGS)

# The long variants (marked `slow`) of tests whose bounded variants run in `make test`.
test-long: $(VENV)/.dev
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(PY) bench/bench_jobs.py

# The scheduler's figures (README): pass cost, pool makespan, fairness, a bursty vast.ai day, price.
bench-scheduler: $(VENV)/.dev
	$(PY) bench/bench_scheduler.py $(BENCH_ARGS)

# Per-job overhead over ComfyUI's own execution (README), against a raw client; needs PostgreSQL + Redis.
bench-dispatch: $(VENV)/.dev
	$(PY) bench/bench_dispatch.py $(BENCH_ARGS)

# The load figures of docs/reliability.md: `make run`'s stack on PostgreSQL + Redis, driven by wrk.
bench-load: $(VENV)/.dev
	command -v wrk >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk)
	$(PY) bench/bench_load.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
