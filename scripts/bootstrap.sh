#!/usr/bin/env bash
# Set up a fresh Debian machine for cityflux: the servers (apt) and a virtualenv (.venv).
# Idempotent: does only what is missing. Run as root or with sudo available.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v influxd >/dev/null 2>&1 || need+=(influxdb)
command -v victoria-metrics >/dev/null 2>&1 || need+=(victoria-metrics)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# headless Chromium: the tests open the scenario report in it and screenshot it
command -v chromium >/dev/null 2>&1 || need+=(chromium)
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
  # urllib3-future (under grafana-client) would overwrite urllib3 at every interpreter start
  # if installed from its wheel; built from source with this flag it stays beside it
  URLLIB3_NO_OVERRIDE=1 PIP_NO_BINARY=urllib3-future .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
