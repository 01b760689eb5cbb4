#!/usr/bin/env bash
# Portal certificate benchmarks on a lab of a controller, three edges in network
# namespaces and pebble (root only): press -> served on every edge for both issuers (next
# to `ca issue-tls` and lego from the same pebble), and full TLS handshakes per second on
# an edge next to nginx serving the same RSA-2048 certificate.
#   sudo scripts/bench-deploy.sh          # release binaries, 5 deploys per issuer, 10 s runs
#   ZM_BIN_DIR=target/debug cargo bench --profile dev -p zonemesh-tests --bench deploy   # full run, debug binaries
#   sudo SMOKE=1 scripts/bench-deploy.sh  # debug build, 1 deploy per issuer, 2 s runs (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "skipped: deploy benchmark needs root"; exit 0; fi
if [ "${SMOKE:-0}" = 1 ]; then
  cargo build --locked -p zonemesh-controller -p zonemesh-agent --bins
  exec cargo bench --locked --profile dev -p zonemesh-tests --bench deploy
fi
# The edges and the controller under test are release builds; the client side (lab
# driver, handshake client) runs in the dev profile, whose dependencies are opt-level 3.
cargo build --release --locked -p zonemesh-controller -p zonemesh-agent --bins
target="${CARGO_TARGET_DIR:-$PWD/target}"
ZM_BIN_DIR="$target/release" exec cargo bench --locked --profile dev -p zonemesh-tests --bench deploy
