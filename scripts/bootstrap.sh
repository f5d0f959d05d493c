#!/usr/bin/env bash
# Set up a fresh Debian machine for cityflux: the servers (apt) and a virtualenv (.venv).
# Idempotent: does only what is missing. Run as root or with sudo available.
# Each step is named with the seconds since the start; pip's and apt's output is condensed to
# counts (the full pip log is kept in $venv/pip.log and shown when it fails).
set -euo pipefail
cd "$(dirname "$0")/.."

# --python-only: the virtualenv alone (make test-unit needs no servers)
python_only=false
[ "${1:-}" = "--python-only" ] && python_only=true
venv=${CITYFLUX_VENV:-.venv}  # another place for the virtualenv (the bootstrap's own test)

began=$SECONDS
step() { printf 'bootstrap [%3ds] %s\n' "$((SECONDS - began))" "$*"; }
# one line rewritten in place on a terminal; elsewhere (a log) every 10th count
if [ -t 1 ]; then tty=1; else tty=0; fi

# pip's lines -> "resolved N packages (last: NAME)", "installing N packages", "installed N"
count_pip() {
  awk -v tty="$tty" '
    function show(text) {
      if (tty) { printf "\r\033[K  %s", text } else { print "  " text }
      fflush()
    }
    /^(Collecting|Requirement already satisfied|Obtaining) / {
      n++; name = $2; sub(/[<>=!~;[].*/, "", name)
      if (tty || n % 10 == 1) show(sprintf("resolved %d packages (%s)", n, name))
      next
    }
    /^Downloading / { d++; if (tty) show(sprintf("resolved %d packages, downloading %d", n, d)) }
    /^Installing collected packages/ {
      k = split($0, parts, ","); show(sprintf("installing %d packages ...", k))
      if (tty) print ""
    }
    /^Successfully installed/ { if (tty) printf "\r\033[K"; print "  installed " (NF - 2) " packages" }
    END { if (tty && n) printf "\r\033[K  %d requirements checked\n", n }
  '
}

pip_install() {
  local log="$venv/pip.log"
  # counted as pip goes (pipefail: pip's failure fails the pipeline)
  if ! "$venv/bin/python" -m pip install --progress-bar off "$@" 2>&1 | tee "$log" | count_pip
  then
    tail -n 30 "$log" >&2
    echo "bootstrap: pip install $* failed (whole log: $log)" >&2
    exit 1
  fi
}

if $python_only; then
  step "checking python3-venv"
else
  step "checking the servers and tools (mosquitto, InfluxDB, VictoriaMetrics, Chromium)"
fi
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
  step "apt: updating the package lists"
  $sudo apt-get update -qq
  step "apt: installing ${need[*]} (with their dependencies; a minute or more)"
  # apt's "Setting up" lines are its progress: one per package
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}" \
    | awk '/^Setting up / { n++; printf "  set up %d: %s\n", n, $3; fflush() }'
else
  step "all there"
fi
# The Debian packages start their own services where an init system runs; cityflux starts its
# own servers on free ports, so those are not needed (and not touched).

if [ ! -x "$venv/bin/python" ]; then
  step "creating the virtualenv $venv"
  python3 -m venv "$venv"
fi
stamp=$venv/.cityflux-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  step "upgrading pip in $venv"
  pip_install --upgrade pip
  # grafana-client and its HTTP stack were dependencies until `dashboards push` used urllib3
  # itself; a virtualenv made before keeps them (urllib3-future can shadow urllib3): remove them
  "$venv/bin/python" -m pip uninstall -q -y grafana-client niquests urllib3-future 2>/dev/null || true
  # [dev] includes every extra ([dashboards], [report], [bench]): the tests exercise them all
  step "installing cityflux with its [dev] extras into $venv (about 40 s the first time)"
  pip_install -e '.[dev]'
  touch "$stamp"
  step "virtualenv ready: $venv/bin/cityflux"
else
  step "virtualenv up to date ($venv)"
fi
