#!/usr/bin/env bash
# zonemesh, running: a controller on its embedded sled store and agents in three zones,
# each in its own network namespace, tunnelled to the other zones. Prints the agents'
# status tables and pings across zones; Ctrl-C stops everything and cleans up. Root only.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run.sh needs root (network namespaces and TUN): sudo scripts/run.sh" >&2; exit 1; }
for p in iproute2 iputils-ping python3; do
  dpkg -s "$p" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null; }
done
cargo build --release --locked --bins
PFX=${PFX:-zmdemo} BIN=$PWD/target/release exec scripts/mesh-lab.sh demo
