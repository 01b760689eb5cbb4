#!/usr/bin/env bash
# zonemesh: every test, from a fresh Debian machine. Run as root (namespace, TUN and
# interop tests need it; without root they are skipped with a printed reason).
#
#   sudo scripts/test.sh          build once, all tests, clippy, smoke benchmarks
#   FULL_BENCH=1 ...              long benchmarks instead of smoke runs
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(openssl wireguard-go wireguard-tools iperf3 iproute2 iputils-ping mtr-tiny nftables
      testssl.sh oathtool argon2 jq bc chromium chromium-driver python3 procps pebble nginx lego
      prometheus lintian openssh-server openssh-client systemd util-linux etcd-server etcd-client protobuf-compiler libprotobuf-dev curl)
if [ "$(id -u)" = 0 ]; then
  missing=()
  for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "note: not root; system packages are not installed and root-only tests will skip"
fi

export CARGO_TERM_COLOR=never
# An error a test returns (anyhow) ends with its message, not a backtrace, so the tail of a
# failure says why; panics still follow RUST_BACKTRACE.
export RUST_LIB_BACKTRACE="${RUST_LIB_BACKTRACE:-0}"
target="${CARGO_TARGET_DIR:-$PWD/target}"
# The packaging test builds .debs with cargo-deb, which Debian does not ship: as root, build
# it once from crates.io into the target directory (a debug build with gzip only: about a
# minute, against 6-17 for the default release build with xz).
if [ "$(id -u)" = 0 ] && ! command -v cargo-deb >/dev/null 2>&1; then
  if [ ! -x "$target/tools/bin/cargo-deb" ]; then
    echo "== installing cargo-deb (for the packaging test)"
    cargo install --quiet --locked --debug cargo-deb@3.8.0 --no-default-features --features gzip \
      --root "$target/tools" --target-dir "$target/tools-build"
  fi
  export PATH="$target/tools/bin:$PATH"
fi

echo "== build (debug, shared by every step)"
cargo build --workspace --all-targets --locked

echo "== tests"
# One thread per test binary keeps the namespace and timing tests from fighting over 2 cores.
log=$(mktemp)
cargo test --workspace --locked --no-fail-fast -- --test-threads=2 --nocapture 2>&1 | tee "$log"
passed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | paste -sd+ | bc)
failed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | paste -sd+ | bc)
skipped=$(grep -c '^skipped: ' "$log" || true)
rm -f "$log"

echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

if [ "${FULL_BENCH:-0}" = 1 ]; then
  echo "== benchmarks (full, release builds)"
  cargo build --release --locked -p zonemesh-agent -p zonemesh-controller --bins
  cargo bench --locked -p zonemesh-ca --bench issuance
  if [ "$(id -u)" = 0 ]; then scripts/bench-dataplane.sh; else echo "skipped: data plane benchmark needs root"; fi
  scripts/bench-agent-rtt.sh
  scripts/bench-watch.sh
  scripts/bench-deploy.sh
  scripts/bench-ssh.sh
  scripts/bench-rotate.sh
else
  # Smoke runs reuse the debug build (dependencies are optimised there too): they show the
  # benchmarks work and print their ratios; the figures that count come from FULL_BENCH=1.
  echo "== benchmarks (smoke, debug build)"
  export SMOKE=1
  cargo bench --locked --profile dev -p zonemesh-ca --bench issuance
  if [ "$(id -u)" = 0 ]; then
    ZM_BIN="$target/debug/zonemesh-agent" scripts/bench-dataplane.sh
    BIN="$target/debug" scripts/bench-agent-rtt.sh
    BIN="$target/debug" scripts/bench-intrusion.sh
    BIN="$target/debug" scripts/bench-rotate.sh
  else
    echo "skipped: data plane benchmark needs root"
  fi
  ZONEMESH_CONTROLLER_BIN="$target/debug/zonemesh-controller" scripts/bench-watch.sh
  scripts/bench-deploy.sh
  scripts/bench-ssh.sh
fi
# Tests that skipped their body (not root, tool missing) printed "skipped: <reason>" above.
echo "tests: $((passed - skipped)) passed, ${failed} failed, ${skipped} skipped"
