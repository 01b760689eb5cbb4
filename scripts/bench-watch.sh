#!/usr/bin/env bash
# Watch fan-out benchmark against a release-built controller.
#   scripts/bench-watch.sh            # 100 and 1,000 agents, 20 changes each
#   SMOKE=1 scripts/bench-watch.sh    # 10 and 50 agents (< 1 minute, for CI)
#   FLEETS=100,1000,3000 CHANGES=30 scripts/bench-watch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${ZONEMESH_CONTROLLER_BIN:-}" ] || cargo build --release -p zonemesh-controller
# The client side runs in the dev profile (dependencies are opt-level 3 there); only the
# controller under test needs to be a release build.
cargo build -p zonemesh-tests --bench watch_fanout
target="${CARGO_TARGET_DIR:-target}"
bench=$(ls -t "$target"/debug/deps/watch_fanout-* | grep -v '\.d$' | head -1)
ulimit -n 65536 2>/dev/null || true
export ZONEMESH_CONTROLLER_BIN="${ZONEMESH_CONTROLLER_BIN:-$target/release/zonemesh-controller}"
exec "$bench"
