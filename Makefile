# The README's two commands: `make deploy` and `make test`. Bare `make` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := venv
STACK ?= prod

.DEFAULT_GOAL := help
.PHONY: help init deploy preview test lint bench cli-check stack-check pulumi-tools lock pristine-roots

## list the targets
help:
	@awk '/^## /{doc=substr($$0,4); next} /^[a-z][a-z-]*:/{if(doc!=""){split($$0,t,":"); printf "  make %-10s %s\n", t[1], doc}; doc=""}' $(MAKEFILE_LIST)
	@echo "  (STACK=$(STACK); see README.md for the first deploy: make init, then make deploy)"

# The deploy needs only the program's runtime; the dev tools are for `make test`. Both install the
# hash-locked files `make lock` writes from requirements*.txt: every package, the transitive ones
# too, at one version, and pip refuses any download whose hash is not in the lock.
# pip.conf in the venv: the language host's `pip list` before every program run never asks PyPI
# whether pip is current (a network round trip, or a stall offline).
$(VENV)/.runtime: requirements.lock
	$(PYTHON) -m venv $(VENV)
	printf '[global]\ndisable-pip-version-check = true\n' >$(VENV)/pip.conf
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	touch $@

$(VENV)/.installed: $(VENV)/.runtime requirements-dev.lock
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --require-hashes -r requirements-dev.lock
	touch $@

# One resolution for every Python from 3.11 on (README: Python 3.11+) and every platform.
LOCK = $(VENV)/bin/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock"
## requirements.lock and requirements-dev.lock (every dependency, with hashes) from requirements*.txt: run after editing those
lock: $(VENV)/.installed
	$(LOCK) --output-file requirements.lock requirements.txt
	$(LOCK) --constraints requirements.lock --output-file requirements-dev.lock requirements-dev.txt

## the Pulumi CLI: installs the pinned one (tools/pulumi/VERSION) into .tools/bin when missing or too old
cli-check:
	@scripts/ensure-pulumi >/dev/null

# the stack must be set up (make init) before the venv is worth building
stack-check: cli-check
	@scripts/pulumi-local $(STACK) stack-check

## set up STACK (default prod) for its first deploy: stack, Hetzner token, SSH key, secrets, first artifact (asks only for what is missing)
init: cli-check
	scripts/init --stack $(STACK) $(INIT_ARGS)

## pulumi up for STACK on a local file:// backend with passphrase secrets (scripts/pulumi-local)
deploy: cli-check stack-check $(VENV)/.runtime
	scripts/pulumi-local $(STACK) up

## pulumi preview --diff for STACK: shows what deploy would change, changes nothing
preview: cli-check stack-check $(VENV)/.runtime
	scripts/pulumi-local $(STACK) preview --diff

JOBS ?= 4
## the whole test suite: lint, types, unit, mock-monitor and real-host tests, in random order on JOBS
## pytest-xdist workers (seed printed, SEED=N make test repeats it; JOBS=0: serial; tests/README.md)
test: $(VENV)/.installed lint
	$(VENV)/bin/pytest -p randomly -n $(JOBS) --dist loadfile $(if $(SEED),--randomly-seed=$(SEED))

## ruff, mypy and shellcheck
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . scripts/build-artifact scripts/init
	$(VENV)/bin/ruff format --check . scripts/build-artifact scripts/init
	$(VENV)/bin/mypy .
	$(VENV)/bin/mypy scripts/build-artifact
	$(VENV)/bin/mypy scripts/init
	shellcheck -S style $$(git ls-files '*.sh') scripts/pulumi-local scripts/ops scripts/ensure-pulumi .ci/run

## release and program benchmarks (reports/*.json)
bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench.release_bench --out reports/release-bench.json
	$(VENV)/bin/python -m bench.engine_bench --out reports/engine-bench.json
	$(VENV)/bin/python -m bench.engine_phases --out reports/engine-phases.json
	$(VENV)/bin/python -m bench.change_bench --out reports/change-bench.json
	$(VENV)/bin/python -m bench.cluster_policy --out reports/cluster-policy.json
	$(VENV)/bin/python -m bench.provision_rerun --out reports/provision-rerun.json
	$(VENV)/bin/python -m bench.pm2_calls --out reports/pm2-calls.json
	$(VENV)/bin/python -m bench.pristine_bench --out reports/pristine-bench.json

## the pristine Debian roots (bookworm, trixie) the pristine-host tests boot, built with debootstrap (cached per recipe)
pristine-roots: $(VENV)/.installed
	$(VENV)/bin/python -m tests.support.pristine_host build bookworm trixie

# The CLI from Go modules; pulumi-resource-command and the Python language host from their source tarballs in
# ../shared/third_party (or COGNIVERN_THIRD_PARTY). Users need none of it: the official CLI does this (README).
## the real engine for tests and CI (CLI + language host + command provider) into .tools/bin, cached
pulumi-tools:
	tools/pulumi/build.sh
