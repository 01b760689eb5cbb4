#!/usr/bin/env bash
# Agent ping RTT through a tunnel while it applies a 2,000-peer update (tests/benches/agent_rtt.rs),
# for the current code and, with FULL_BENCH=1, the anchor: the code before the agent runtime
# split (OLD_REV, default the parent of 574255c), built in release in its own worktree
# (OLD_TREE, default ../wt-old beside the repository) with its own target directory.
#
#   sudo scripts/bench-agent-rtt.sh                 # current release build, 2,000 peers
#   sudo FULL_BENCH=1 scripts/bench-agent-rtt.sh    # anchor and current, same run
#   sudo SMOKE=1 BIN=target/debug scripts/bench-agent-rtt.sh   # 200 peers, current only (CI)
#
# Env: PEERS, CONCURRENCY (see the bench), BIN (directory with the current binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "skipped: agent RTT benchmark needs root"; exit 0; }
target="${CARGO_TARGET_DIR:-$PWD/target}"
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked -q -p zonemesh-controller -p zonemesh-agent --bins
  BIN=$target/release
fi
builds="current=$(cd "$BIN" && pwd)"
if [ "${FULL_BENCH:-0}" = 1 ] && [ "${SMOKE:-0}" != 1 ]; then
  OLD_REV=${OLD_REV:-574255c^}
  OLD_TREE=${OLD_TREE:-$PWD/../wt-old}
  [ -d "$OLD_TREE" ] || git worktree add --detach "$OLD_TREE" "$OLD_REV"
  (cd "$OLD_TREE" && CARGO_TARGET_DIR="$OLD_TREE/target" cargo build --release --locked -q -p zonemesh-controller -p zonemesh-agent --bins)
  builds="before=$OLD_TREE/target/release,$builds"
fi
# The bench's own client side (key pool, enrollment flood) runs in the dev profile.
cargo build --locked -q -p zonemesh-tests --bench agent_rtt
bench=$(ls -t "$target"/debug/deps/agent_rtt-* | grep -v '\.d$' | head -1)
BUILDS="$builds" exec "$bench"
