# Quick start: `make demo` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
# The first Python 3.11+ on PATH, looked up once. A pyenv shim for a version that is not
# installed exists but fails, so the probe's output and errors both go to /dev/null.
ifndef PYTHON
PYTHON := $(shell for p in python3.13 python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 \
	&& { echo $$p; break; }; done)
endif
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-unit test-integration test-cluster lint bench bench-soak bench-models bench-stages mosquitto dicom3tools dcmtk orthanc rabbitmq binutils cc clean models bench-gateway

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "Python 3.11 or newer is required"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=77" wheel

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/iomt-agent demo --workdir demo-work

# Mosquitto is the broker of the integration tests; install it when it is missing.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
		echo "installing mosquitto (Debian package)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mosquitto; }

# dciodvfy (Debian's dicom3tools) validates the derived instances in the tests.
dicom3tools:
	@command -v dciodvfy >/dev/null 2>&1 || { \
		echo "installing dicom3tools (Debian package)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dicom3tools; }

# objdump (Debian's binutils) finds the instructions that bench/avx2_kernels.py patches.
binutils:
	@command -v objdump >/dev/null 2>&1 || { \
		echo "installing binutils (Debian package)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq binutils; }

# A C compiler (Debian's gcc) builds bench/slow_sync.py's fsync wrapper.
cc:
	@command -v cc >/dev/null 2>&1 || { \
		echo "installing gcc (Debian package)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq gcc libc6-dev; }

# dcmtk's storescu is the modality of the DICOM chain test (tests/integration/test_dicom_chain.py).
dcmtk:
	@command -v storescu >/dev/null 2>&1 || { \
		echo "installing dcmtk (Debian package)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dcmtk; }

# Orthanc with its DICOMweb plugin is the archive that `receive --stow-url` stores into.
orthanc:
	@{ command -v Orthanc || test -x /usr/sbin/Orthanc; } >/dev/null 2>&1 \
		&& test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || { \
		echo "installing orthanc and orthanc-dicomweb (Debian packages)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq orthanc orthanc-dicomweb; }

# RabbitMQ (Debian's rabbitmq-server, its MQTT plugin) is the clustered broker of the
# failover test; the test starts its own three nodes, so the package's service is not needed.
rabbitmq:
	@test -x /usr/lib/rabbitmq/bin/rabbitmq-server || { \
		echo "installing rabbitmq-server (Debian package)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq rabbitmq-server; }

# Two pytest workers (pytest-xdist), one test file each at a time: the integration tests
# mostly wait on brokers and processes, so the suite takes about half the time on 2 cores.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed mosquitto dicom3tools dcmtk orthanc rabbitmq binutils cc
	$(BIN)/python -m pytest -q -m "not cluster" -n $(TEST_WORKERS) --dist loadfile

# The three-node RabbitMQ cluster test (about a minute to form the cluster on two cores).
test-cluster: $(VENV)/.installed mosquitto rabbitmq
	$(BIN)/python -m pytest -q -m cluster

test-unit: $(VENV)/.installed dicom3tools
	$(BIN)/python -m pytest -q -m "not integration"

# The whole suite (as make test) with onnxruntime and LiteRT on their AVX2 kernels and numpy
# and OpenSSL without AVX-512 (bench/avx2_kernels.py), at native speed: what an AVX2-only x86
# node runs, on an x86 machine that has AVX-512 VNNI. x86-64 only; not run by .ci/run.
.PHONY: test-avx2
test-avx2: $(VENV)/.installed mosquitto dicom3tools dcmtk orthanc rabbitmq binutils cc
	$(BIN)/python bench/avx2_kernels.py -- $(BIN)/python -m pytest -q -m "not cluster" \
		-n $(TEST_WORKERS) --dist loadfile

# The CPU matrix (tools/cpu_matrix): qemu-user-static runs the x86 venv as Haswell and an
# arm64 rootfs that debootstrap builds; both installed when missing.
.PHONY: cpu-tools test-cpus
cpu-tools:
	@{ command -v qemu-x86_64-static && command -v qemu-aarch64-static \
		&& { command -v debootstrap || test -x /usr/sbin/debootstrap; }; } >/dev/null 2>&1 || { \
		echo "installing qemu-user-static and debootstrap (Debian packages)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq qemu-user-static debootstrap; }

# The int8 guard on every bundle x runtime (and the quantizing tests) on native, Haswell,
# cortex-a72 and cortex-a76; the rootfs and wheels are cached in $$IOMT_CPU_CACHE.
test-cpus: $(VENV)/.installed cpu-tools
	$(SUDO) env IOMT_CPU_CACHE="$${IOMT_CPU_CACHE-}" IOMT_CPU_MIRROR="$${IOMT_CPU_MIRROR-}" \
		$(BIN)/python -m tools.cpu_matrix --json bench-out/cpus.json

# The whole hostile corpus (10,000 payloads, tests/fuzz/corpus.py) through the running agent
# and through the decoder in-process; figures in bench-out/hostile*.json.
.PHONY: hostile fuzz
hostile: $(VENV)/.installed mosquitto
	mkdir -p bench-out
	IOMT_HOSTILE_N=10000 IOMT_HOSTILE_JSON=bench-out/hostile.json $(BIN)/python -m pytest -q -s \
		-o timeout=3600 -W ignore tests/integration/test_hostile_live.py
	IOMT_HOSTILE_N=10000 IOMT_HOSTILE_JSON=bench-out/hostile-decoder.json $(BIN)/python -m pytest \
		-q -s -o timeout=3600 -W ignore tests/fuzz/test_corpus.py

# Coverage-guided fuzzing of the decoder (atheris) for FUZZ_SECONDS; a crash is written to
# tests/fuzz/crashes/, which tests/fuzz/test_corpus.py replays as regression cases.
FUZZ_SECONDS ?= 300
fuzz: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	$(BIN)/python -m tests.fuzz.fuzz_decode -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=tests/fuzz/crashes/ -rss_limit_mb=2048 -timeout=20

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(VENV)/.installed mosquitto
	$(BIN)/python -m bench.e2e --slices 1000 --json bench-out/e2e.json

# Soak: a sustained scan rate for MINUTES (default 5) with RSS, open files, threads and
# store size sampled; bench-out/soak.json and bench-out/soak.png (docs/reliability.md, Soak).
bench-soak: $(VENV)/.installed mosquitto
	$(BIN)/python -m bench.soak --minutes $(or $(MINUTES),5) --json bench-out/soak.json \
		--png bench-out/soak.png

# The agent's own work per slice (decode, preprocess, derive, seal); BASELINE=<checkout>
# times another commit's code in turns with this tree.
bench-stages: $(VENV)/.installed
	$(BIN)/python bench/stages.py $(if $(BASELINE),--baseline $(BASELINE)) --json bench-out/stages.json

# Every bundle under models/ x runtime x precision on this machine (no broker needed).
bench-models: $(VENV)/.installed
	$(BIN)/iomt-agent bench --json bench-out/models.json

# C-STORE through the gateway: success after the broker's PUBACK vs after the spool's commit.
bench-gateway: $(VENV)/.installed mosquitto dcmtk
	$(BIN)/python bench/gateway.py --json bench-out/gateway.json

models:
	$(MAKE) -C models

# Mutation testing of the durability-critical modules ([tool.mutmut] in pyproject.toml; not
# part of `make test`): mutmut, then the score per module (tools/mutation_score.py).
.PHONY: mutation
mutation: $(VENV)/.installed mosquitto
	rm -rf mutants
	-$(BIN)/mutmut run --max-children 2
	$(BIN)/python -m tools.mutation_score

clean:
	rm -rf $(VENV) demo-work bench-out .pytest_cache .mypy_cache .ruff_cache
