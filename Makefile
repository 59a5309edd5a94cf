# The README's two commands: `make deploy` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := venv
STACK ?= prod

.PHONY: deploy preview test lint bench

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

## pulumi up for $(STACK) on a local file:// backend with passphrase secrets (scripts/pulumi-local)
deploy: $(VENV)/.installed
	scripts/pulumi-local $(STACK) up

preview: $(VENV)/.installed
	scripts/pulumi-local $(STACK) preview --diff

## the whole test suite: lint, types, unit, mock-monitor and real-host tests, in random order
## (pytest-randomly prints the seed; repeat an order with SEED=N make test)
test: $(VENV)/.installed lint
	$(VENV)/bin/pytest -p randomly $(if $(SEED),--randomly-seed=$(SEED))

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . scripts/build-artifact
	$(VENV)/bin/ruff format --check . scripts/build-artifact
	$(VENV)/bin/mypy .
	$(VENV)/bin/mypy scripts/build-artifact
	shellcheck -S style $$(git ls-files '*.sh') scripts/pulumi-local scripts/ops .ci/run

bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench.release_bench --out reports/release-bench.json
	$(VENV)/bin/python -m bench.engine_bench --out reports/engine-bench.json
	$(VENV)/bin/python -m bench.cluster_policy --out reports/cluster-policy.json
	$(VENV)/bin/python -m bench.provision_rerun --out reports/provision-rerun.json
