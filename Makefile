# Two commands do all the set-up on a fresh Debian machine, as root:
#   make demo   - a gateway, an agent and a vendor on this machine, a tunnel, the audit trail
#   make test   - installs everything the tests need (system packages too) and runs them
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# What the tests run for real: pcscd + the vpcd reader driver (smartcard), swig and
# libpcsclite-dev (to build pyscard), mosquitto (cluster bus), and the benchmark's
# reference tools (OpenSSH, haproxy); SoftHSM2 and OpenSC (PKCS#11 modules for the
# smartcard through middleware, and OpenSC's pkcs11-tool to fill the SoftHSM tokens);
# wine64 runs the Windows build of CPython for the Windows journeys (tests/windows), and
# mingw-w64 builds the one DLL Debian 12's Wine 8 lacks for it (tests/support/wine.py);
# postgresql is the cluster's shared directory, started per test run (tests/support/postgres.py).
SYSTEM_PACKAGES := pcscd vsmartcard-vpcd libpcsclite-dev swig mosquitto postgresql \
                   openssh-server openssh-client haproxy softhsm2 opensc jq \
                   wine64 gcc-mingw-w64-x86-64-win32 systemd

# make fuzz: every fuzz target (tests/fuzz) for FUZZ_SECONDS each, coverage-guided (atheris).
FUZZ_SECONDS ?= 60

.PHONY: demo demo-cluster test test-windows lint typecheck unit system-deps bench bench-cluster fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,smartcard,pkcs11,rfc5280,fido2,cluster]'
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/python -m gatewayd.demo demo-state

$(VENV)/.cluster: pyproject.toml | $(VENV)/.runtime
	$(BIN)/pip install --quiet -e '.[cluster]'
	touch $@

# Three nodes over Mosquitto, an agent that moves when its node is killed, the merged trail.
demo-cluster: system-deps $(VENV)/.cluster
	$(BIN)/python -m gatewayd.demo_cluster demo-cluster-state

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: $(VENV)/.test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(VENV)/.test
	$(BIN)/mypy relay auth gatewayd cli

unit: $(VENV)/.test
	$(BIN)/pytest -m "not integration and not smartcard"

# Worker processes for pytest (pytest-xdist): the integration tests mostly wait on the
# daemons and commands they start, so twice the cores keeps a 2-core machine busy.
# TEST_WORKERS=0 runs everything in one process. See docs/testing.md.
TEST_WORKERS ?= 4

test: system-deps $(VENV)/.test
	$(MAKE) --no-print-directory lint typecheck
	$(BIN)/pytest -n $(TEST_WORKERS) --durations=25 --cov=relay --cov=auth --cov=gatewayd --cov=cli --cov-branch --cov-report=term:skip-covered --cov-fail-under=85

# gw connect and gw agent as the Windows build of CPython runs them (under Wine), against a
# real gatewayd on loopback; the Windows Python tree is built once under .cache/win/.
# make test runs the same tests (skipped, with the reason, where wine64 is missing).
test-windows: system-deps $(VENV)/.test
	$(BIN)/pytest tests/windows

$(VENV)/.fuzz: pyproject.toml | $(VENV)/.test
	$(BIN)/pip install --quiet -e '.[fuzz]'
	touch $@

# The same harnesses run briefly under Hypothesis in `make test` (tests/fuzz/test_fuzz_smoke.py).
fuzz: $(VENV)/.test $(VENV)/.fuzz
	$(BIN)/python tests/fuzz/run.py all --seconds $(FUZZ_SECONDS)

# One table: gw against haproxy and ssh -J, measured in the same run (see README).
# The issue's full run: make bench BENCH_ARGS="--mib 1024 --agents 10000"; add --check
# to fail on a missed target, --baseline FILE.json to fail on a regression.
BENCH_ARGS ?= --mib 256 --runs 5
# The project's modules are byte-compiled first, as an installed package is: without
# that every process the bench starts compiles them again (PYTHONDONTWRITEBYTECODE).
bench: system-deps $(VENV)/.test
	$(BIN)/python -m compileall -q -j 0 relay auth gatewayd cli
	$(BIN)/python bench/tunnel_bench.py $(BENCH_ARGS)

# The audit trail: a filtered query and verify over 1,000,000 records, beside jq.
bench-audit: system-deps $(VENV)/.test
	$(BIN)/python bench/audit_query.py

# One gatewayd node against three: tunnels opened per second, agents held.
bench-cluster: system-deps $(VENV)/.test
	$(BIN)/python bench/cluster_bench.py

clean:
	rm -rf $(VENV) demo-state demo-cluster-state .mypy_cache .ruff_cache .pytest_cache .coverage .cache/win
