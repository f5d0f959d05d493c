#!/usr/bin/env bash
# Set up a fresh Debian machine for cityflux: the servers (apt) and a virtualenv (.venv).
# Idempotent: does only what is missing. Run as root or with sudo available.
set -euo pipefail
cd "$(dirname "$0")/.."

# --python-only: the virtualenv alone (make test-unit needs no servers)
python_only=false
[ "${1:-}" = "--python-only" ] && python_only=true

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v influxd >/dev/null 2>&1 || need+=(influxdb)
command -v victoria-metrics >/dev/null 2>&1 || need+=(victoria-metrics)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# headless Chromium: the tests open the scenario report in it and screenshot it
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if $python_only; then
  need=()
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "bootstrap: installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The Debian packages start their own services where an init system runs; cityflux starts its
# own servers on free ports, so those are not needed (and not touched).

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.cityflux-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # grafana-client and its HTTP stack were dependencies until `dashboards push` used urllib3
  # itself; a virtualenv made before keeps them (urllib3-future can shadow urllib3): remove them
  .venv/bin/python -m pip uninstall -q -y grafana-client niquests urllib3-future 2>/dev/null || true
  # [dev] includes every extra ([dashboards], [report], [bench]): the tests exercise them all
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
