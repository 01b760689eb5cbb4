#!/usr/bin/env bash
# Enrollments per second on sled, on one etcd member and on three (same run).
#   scripts/bench-store.sh           # release controller, 200 enrollments per store
#   SMOKE=1 scripts/bench-store.sh   # debug build, 40 enrollments per store (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SMOKE:-0}" = 1 ]; then
  cargo build --locked -p zonemesh-controller --bins
  ZM_STORE_ENROLLS=${ZM_STORE_ENROLLS:-40} exec cargo bench --locked --profile dev -p zonemesh-tests --bench store
fi
cargo build --release --locked -p zonemesh-controller --bins
target="${CARGO_TARGET_DIR:-$PWD/target}"
ZM_BIN_DIR="$target/release" exec cargo bench --locked --profile dev -p zonemesh-tests --bench store
