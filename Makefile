CARGO ?= cargo
PYTHON ?= python3
export PYTHON

BIN_DIR := $(CURDIR)/target/debug

.PHONY: services cluster cluster-stop venv build release run migrate test celery-suite fuzz chaos bench bench-quick profile fmt lint clean

services:
	bash scripts/services.sh

# Three clustered RabbitMQ nodes beside the main one (AMQP 5701-5703, data in
# target/rabbitmq-cluster): amqp://guest:guest@127.0.0.1:5701//;...:5702//;...:5703//
cluster:
	bash scripts/cluster.sh start

cluster-stop:
	bash scripts/cluster.sh stop

venv:
	bash scripts/venv.sh conformance/requirements.txt

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --workspace --bins

run: services build
	BIN_DIR=$(BIN_DIR) bash scripts/run.sh

migrate: services build
	$(BIN_DIR)/web --config celeryconfig.toml --migrate

test: services venv
	bash scripts/tool.sh openssl
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace
	bash scripts/chromium.sh
	RCELERY_BIN_DIR=$(BIN_DIR) .venv/bin/pytest -q -n 2 --dist loadgroup -m "not alone" interop
	RCELERY_BIN_DIR=$(BIN_DIR) .venv/bin/pytest -q -m alone interop
	.venv/bin/pytest -q bench/test_cpu.py
	RCELERY_BIN_DIR=$(BIN_DIR) .venv/bin/python conformance/suite/run.py --broker redis \
		--file test_inspect.py --file test_tasks.py

# Celery's own integration suite (t/integration of the celery sdist the venv pins) against our
# worker, on both brokers, with no Python worker: prints pytest's summary per broker and writes
# every test's outcome to conformance/RESULTS.md. make test runs test_inspect and test_tasks
# of it on Redis.
celery-suite: services venv
	$(CARGO) build -p conformance
	RCELERY_BIN_DIR=$(BIN_DIR) .venv/bin/python conformance/suite/run.py \
		--results conformance/RESULTS.md

# Property-based fuzzing of the wire decoders, the dispatcher (random and mutated task messages
# through a real worker on both brokers, which must still answer ping and run a task) and the
# web app's request parsing, bounded: PROPTEST_CASES inputs per property.
fuzz: services
	PROPTEST_CASES=$${PROPTEST_CASES:-20000} $(CARGO) test -p runtime --release --test decode_fuzz
	PROPTEST_CASES=$${PROPTEST_CASES:-20000} $(CARGO) test -p tasks --release --test dispatcher_fuzz
	PROPTEST_CASES=$${PROPTEST_CASES:-20000} $(CARGO) test -p web --release --test request_fuzz

# The chaos run at full size (make test runs it at 1,500 tasks and 300 web jobs per broker):
# 10,000 tasks and 2,000 web jobs per broker; figures in interop/artifacts/chaos-*.json. The
# RabbitMQ cluster losing a node (make test: 300 tasks, 60 web jobs) with 2,000 tasks and 2,000
# web jobs: interop/artifacts/cluster.json. The Sentinel failovers (make test: 600 tasks, 120
# web jobs) with 5,000 tasks and 1,000 web jobs: interop/artifacts/sentinel.json. Four workers
# sharing a cluster rate limit (make test: 20/s) at the issue's 60/m, 200 tasks (over 3 minutes).
chaos: services venv build
	CHAOS_TASKS=$${CHAOS_TASKS:-10000} CHAOS_WEB_JOBS=$${CHAOS_WEB_JOBS:-2000} \
		CLUSTER_TASKS=$${CLUSTER_TASKS:-2000} CLUSTER_WEB_JOBS=$${CLUSTER_WEB_JOBS:-2000} \
		SENTINEL_TASKS=$${SENTINEL_TASKS:-5000} SENTINEL_WEB_JOBS=$${SENTINEL_WEB_JOBS:-1000} \
		RATE_LIMIT=$${RATE_LIMIT:-60/m} RATE_TASKS=$${RATE_TASKS:-200} \
		RCELERY_BIN_DIR=$(BIN_DIR) .venv/bin/pytest -q -rP interop/test_chaos.py interop/test_cluster.py \
		interop/test_sentinel.py interop/test_rate.py

# Ours against Python Celery on this machine, both brokers: bench/RESULTS.md, bench/results/.
bench: services release
	bash scripts/venv.sh bench/requirements.txt
	bash scripts/tool.sh wrk
	cd bench && ../.venv/bin/python bench.py

# The same, one small repetition of everything (about 3 minutes).
bench-quick: services release
	bash scripts/venv.sh bench/requirements.txt
	bash scripts/tool.sh wrk
	cd bench && ../.venv/bin/python bench.py --quick

# Where the CPU time goes in our worker and web app, each broker: bench/PROFILE.md and flame
# graphs in bench/results/profile/ (perf from Debian's linux-perf, inferno from crates.io).
profile: services
	$(CARGO) build --profile profiling --workspace --bins
	bash scripts/venv.sh bench/requirements.txt
	bash scripts/tool.sh wrk
	bash scripts/tool.sh perf linux-perf
	command -v inferno-flamegraph >/dev/null || $(CARGO) install --locked inferno
	cd bench && ../.venv/bin/python profile.py

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf .venv .pytest_cache interop/.pytest_cache interop/artifacts bench/results
