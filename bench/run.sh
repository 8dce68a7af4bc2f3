#!/usr/bin/env bash
# Run the sidecar data-plane benchmark (bench/bench_proxy.py); installs wrk from Debian if missing.
# Usage: bench/run.sh [bench_proxy.py options]   e.g. bench/run.sh --duration 2 --concurrency 8
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null 2>&1; then
  echo "bench: installing wrk (Debian package) ..." >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk >/dev/null
fi
PY="${PY:-.venv/bin/python}"
exec "$PY" bench/bench_proxy.py "$@"
