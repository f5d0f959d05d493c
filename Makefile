# The two commands of the README, and the checks CI runs.
.PHONY: demo run test test-unit check bench bench-simulate bench-chaos

demo:  ## set up, then a simulated city -> mosquitto -> cityflux -> InfluxDB, shown live
	@scripts/bootstrap.sh
	.venv/bin/cityflux demo

run:   ## set up, start local mosquitto + InfluxDB, and ingest (Ctrl-C stops everything)
	@scripts/bootstrap.sh
	.venv/bin/cityflux up

test:  ## set up, then run the whole test suite against real servers
	@scripts/bootstrap.sh
	.venv/bin/pytest

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
