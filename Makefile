# The two commands of the README, and the checks CI runs.
.PHONY: demo run test check bench bench-simulate

demo:  ## set up, then a simulated city -> mosquitto -> cityflux -> InfluxDB, shown live
	@scripts/bootstrap.sh
	.venv/bin/cityflux demo

run:   ## set up, start local mosquitto + InfluxDB, and ingest (Ctrl-C stops everything)
	@scripts/bootstrap.sh
	.venv/bin/cityflux up

test:  ## set up, then run the whole test suite against real servers
	@scripts/bootstrap.sh
	.venv/bin/pytest

check: ## lint and type-check
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

bench: ## ingest benchmark: mosquitto_sub ceiling vs naive script vs cityflux
	@scripts/bootstrap.sh
	.venv/bin/python -m bench.ingest

bench-simulate: ## simulator and replay throughput against mosquitto_pub
	@scripts/bootstrap.sh
	.venv/bin/python -m bench.simulate
