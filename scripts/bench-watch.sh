#!/usr/bin/env bash
# Watch fan-out benchmark against a release-built controller, next to the previous design.
#   scripts/bench-watch.sh            # 1,000, 3,000 and 10,000 agents, 20 changes and a
#                                     # burst of 100 enrollments at each
#   SMOKE=1 scripts/bench-watch.sh    # 10 and 50 agents (< 1 minute, for CI)
#   FLEETS=1000,3000 CHANGES=30 BURST=100 scripts/bench-watch.sh
#   TWO_ON_ETCD=1 scripts/bench-watch.sh   # two controllers on a three-member etcd, watchers
#                                     # split over them, next to one on sled (1,000 agents;
#                                     # SMOKE=1: 100); needs etcd-server and etcd-client
#   PREV_CONTROLLER_BIN=/path/to/old/zonemesh-controller   # the anchor (default
#                                     # /work/prefan/zonemesh-controller when present;
#                                     # empty to skip); stopped at MEM_CAP_MIB (8192)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${ZONEMESH_CONTROLLER_BIN:-}" ] || cargo build --release --locked -p zonemesh-controller
# The client side runs in the dev profile (dependencies are opt-level 3 there); only the
# controller under test needs to be a release build.
cargo build --locked -p zonemesh-tests --bench watch_fanout
target="${CARGO_TARGET_DIR:-target}"
bench=$(ls -t "$target"/debug/deps/watch_fanout-* | grep -v '\.d$' | head -1)
# One connection per simulated agent on both sides: take the hard limit (20,000 here).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
export ZONEMESH_CONTROLLER_BIN="${ZONEMESH_CONTROLLER_BIN:-$target/release/zonemesh-controller}"
exec "$bench"
