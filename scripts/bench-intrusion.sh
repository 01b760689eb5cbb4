#!/usr/bin/env bash
# Intrusion feedback benchmark (tests/benches/intrusion.rs) on the namespaced mesh lab:
# time from the threshold-crossing log line to the block on all six nodes (p50/p99),
# events/s the controller absorbs, iperf3 through the tunnel with an empty and a
# 10,000-entry block set in the same run.
#
#   sudo scripts/bench-intrusion.sh                     # release build, 20 attackers, 10 s iperf3
#   sudo SMOKE=1 BIN=target/debug scripts/bench-intrusion.sh   # 5 attackers, 2 s (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "skipped: intrusion benchmark needs root"; exit 0; }
target="${CARGO_TARGET_DIR:-$PWD/target}"
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked -q -p zonemesh-controller -p zonemesh-agent --bins
  BIN=$target/release
fi
cargo build --locked -q -p zonemesh-tests --bench intrusion
bench=$(ls -t "$target"/debug/deps/intrusion-* | grep -v '\.d$' | head -1)
ZM_BIN_DIR=$(cd "$BIN" && pwd) exec "$bench"
