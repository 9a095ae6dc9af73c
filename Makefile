# The two commands a fresh clone needs: `make serve` and `make test`.
# Both create .venv/ (Python) and node_modules/ (TypeScript codegen and clients)
# from the pinned dependencies first; nothing has to be installed by hand.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.PHONY: serve test setup container-tools image check lint typecheck proto-check pytest clean

serve: $(PY_STAMP)
	$(BIN)/expense-auth serve

test: setup check pytest

setup: $(PY_STAMP) $(NODE_STAMP) container-tools

$(PY_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@# The browser tests drive Debian's Chromium (Playwright cannot download one here);
	@# the crash test counts fsyncs with strace.
	command -v chromium >/dev/null && command -v strace >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium strace)
	touch $@

# The container image (deploy/container/, tests/deploy/) is built and run with Debian's
# podman; its base comes from mmdebstrap; this host's cgroups need runc (see
# deploy/container/containers.conf).
container-tools:
	@command -v podman >/dev/null && command -v mmdebstrap >/dev/null && \
		command -v runc >/dev/null && command -v curl >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq podman mmdebstrap runc curl)

# The image, localhost/expense-auth:latest (docs/operations.md, "Deploy with a container").
image: container-tools
	deploy/container/build.sh

check: lint typecheck proto-check

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# The contract: buf lint, format and breaking (against the previous commit), and
# gen/ must be exactly what buf generates from proto/.
proto-check: setup
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	@if git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then \
		$(BIN)/buf breaking --against '.git#ref=HEAD~1'; fi
	@before=$$(mktemp -d) && cp -r gen "$$before/" && $(BIN)/buf generate && \
		if ! diff -r -x __pycache__ "$$before/gen" gen >/dev/null; then \
			echo "gen/ is stale: run '$(BIN)/buf generate' and commit the result" >&2; exit 1; fi

pytest: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) node_modules

# Benchmarks (bench/, docs/benchmarks.md): `make bench`, or `make bench BENCH_ARGS=--quick`
# for a smoke run in under a minute. Needs h2load (Debian nghttp2-client) and
# matplotlib + py-spy (the `bench` extra); installs what is missing.
.PHONY: bench
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): pyproject.toml $(PY_STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $@
bench: $(BENCH_STAMP) $(NODE_STAMP)
	@command -v h2load >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq nghttp2-client; }
	$(BIN)/python -m bench $(BENCH_ARGS)
