# The two commands of the README, and the checks CI runs.
.PHONY: demo run install test test-unit check bench bench-simulate bench-chaos bench-analytics bench-scale bench-scale-nats

# `make install` links the command here (Debian's ~/.profile puts it on the PATH when it exists)
BINDIR ?= $(HOME)/.local/bin

demo:  ## set up, then a simulated city -> mosquitto -> cityflux -> InfluxDB, shown live
	@scripts/bootstrap.sh
	.venv/bin/cityflux demo

run:   ## set up, start local mosquitto + InfluxDB, and ingest (Ctrl-C stops everything)
	@scripts/bootstrap.sh
	.venv/bin/cityflux up

install: ## the `cityflux` command in every new shell: a link in $(BINDIR) to .venv/bin/cityflux
	@scripts/bootstrap.sh --python-only
	@mkdir -p "$(BINDIR)"
	ln -sfn "$(CURDIR)/.venv/bin/cityflux" "$(BINDIR)/cityflux"
	@case ":$$PATH:" in *":$(BINDIR):"*) ;; \
	  *) echo "$(BINDIR) is not on your PATH: export PATH=\"$(BINDIR):\$$PATH\"" ;; esac

# `make test`: two processes for the tests that mostly wait on servers, then alone the
# timing-sensitive ones (marker `serial`, tests/conftest.py); both passes run, either failing
# fails. A plain `.venv/bin/pytest` runs the same tests one at a time.
test:  ## set up, then run the whole test suite against real servers
	@scripts/bootstrap.sh
	.venv/bin/pytest -n 2 --dist loadfile -m "not serial"; a=$$?; \
	  .venv/bin/pytest -m serial; b=$$?; exit $$((a | b))

test-unit: ## the fast inner loop: unit tests only, no servers and no apt (about 30 s)
	@scripts/bootstrap.sh --python-only
	CITYFLUX_TEST_FAST=1 .venv/bin/pytest -q tests/unit

check: ## lint, type-check, and the layers contract (import-linter)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

bench: ## ingest benchmark (shipped settings, every point counted): ratio table + bench/results/ingest-*.json
	@scripts/bootstrap.sh
	.venv/bin/python -m bench.ingest

bench-simulate: ## simulator and replay vs mosquitto_pub and paho, every message counted: bench/results/simulate-*.json
	@scripts/bootstrap.sh
	.venv/bin/python -m bench.simulate

bench-chaos: ## 10 min at 5,000 msg/s while cityflux, InfluxDB and mosquitto are broken on a schedule
	@scripts/bootstrap.sh
	.venv/bin/python -m bench.chaos --minutes 10 --rate 5000

bench-analytics: ## analytics core in-process, then publish -> alert latency at 5,000 msg/s, five runs
	@scripts/bootstrap.sh
	.venv/bin/python -m bench.analytics --runs 5

bench-scale: ## 1 vs 2 workers on a backlog, servers on core 1 and workers on core 0, then unpinned: bench/results/scale-*.json
	@scripts/bootstrap.sh
	.venv/bin/python -m bench.scale

bench-scale-nats: ## 1/2/4 workers on NATS JetStream vs one on MQTT (100k backlog), then partition balance of the 100k city: bench/results/scale_nats-*.json, partitions-*.json
	@scripts/bootstrap.sh
	.venv/bin/python -m bench.scale_nats --messages 100000
	.venv/bin/python -m bench.partitions --partitions 16,64
