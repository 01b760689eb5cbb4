#!/usr/bin/env bash
# Backup and restore of a controller store with 10,000 nodes: `backup --out` while the
# controller serves and `restore --from` into a new directory, timed and sized next to
# `tar czf` and `cp -a` of the same data directory in the same run.
#   scripts/bench-backup.sh           # release controller, 10,000 nodes
#   SMOKE=1 scripts/bench-backup.sh   # debug build, 500 nodes (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SMOKE:-0}" = 1 ]; then
  cargo build --locked -p zonemesh-controller --bins
  exec cargo bench --locked --profile dev -p zonemesh-tests --bench backup
fi
cargo build --release --locked -p zonemesh-controller --bins
target="${CARGO_TARGET_DIR:-$PWD/target}"
ZM_BIN_DIR="$target/release" exec cargo bench --locked --profile dev -p zonemesh-tests --bench backup
