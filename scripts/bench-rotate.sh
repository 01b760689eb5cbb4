#!/usr/bin/env bash
# Time for the whole mesh-lab fleet (3 zones x 2 agents, scripts/mesh-lab.sh) to move onto a
# new intermediate after `ca rotate-intermediate`, with the renewal spread of the run:
#
#   sudo scripts/bench-rotate.sh                  # the default spread (15 min), release build
#   sudo SMOKE=1 BIN=target/debug scripts/bench-rotate.sh   # a 10 s spread (CI)
#
# Prints the window and the measured time (the anchor: the window itself; the fleet is done
# once the node with the latest point of the window has renewed). Env: SPREAD (override the
# window, e.g. 2m), BIN (directory with the binaries), PFX (lab prefix, default zbr).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "skipped: CA rotation benchmark needs root (network namespaces)"; exit 0; }
[ -e /dev/net/tun ] || { echo "skipped: CA rotation benchmark needs /dev/net/tun"; exit 0; }
command -v openssl >/dev/null || { echo "skipped: openssl not installed"; exit 0; }
target="${CARGO_TARGET_DIR:-$PWD/target}"
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked -q -p zonemesh-controller -p zonemesh-agent --bins
  BIN=$target/release
fi
export BIN PFX=${PFX:-zbr}
export DIR=/tmp/zonemesh-lab-$PFX
if [ "${SMOKE:-0}" = 1 ]; then SPREAD=${SPREAD:-10s}; fi
lab() { scripts/mesh-lab.sh "$@"; }
ctl() { "$BIN/zonemesh-controller" --data-dir "$DIR/ctl" "$@"; }
lab down >/dev/null 2>&1 || true
trap 'lab down >/dev/null 2>&1 || true' EXIT
lab up >/dev/null
nodes=(a1 a2 b1 b2 c1 c2)
args=()
[ -n "${SPREAD:-}" ] && args=(--spread "$SPREAD")
start=$(date +%s.%N)
out=$(ctl ca rotate-intermediate "${args[@]}" --json)
rotated=$(date +%s.%N)
new_id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["added"][0]["id"])' <<<"$out")
ctl ca export --id "$new_id" > "$DIR/new-int.pem"
want="issuer=$(openssl x509 -noout -subject -in "$DIR/new-int.pem" | sed 's/^subject=//')"
window=${SPREAD:-15m (the default)}
limit=$(( $(python3 -c 'import sys,re
s=sys.argv[1] or "15m"; m=re.fullmatch(r"(\d+)(s|m|h)", s); print(int(m[1])*{"s":1,"m":60,"h":3600}[m[2]])' "${SPREAD:-}") + 120 ))
while :; do
  behind=0
  for n in "${nodes[@]}"; do
    [ "$(openssl x509 -noout -issuer -in "$DIR/$n/node.crt")" = "$want" ] || behind=$((behind+1))
  done
  now=$(date +%s.%N)
  [ "$behind" = 0 ] && break
  if python3 -c "import sys; sys.exit(0 if float(sys.argv[1])-float(sys.argv[2]) > float(sys.argv[3]) else 1)" "$now" "$start" "$limit"; then
    echo "bench-rotate: $behind agent(s) still on the old intermediate after ${limit}s" >&2; exit 1
  fi
  sleep 0.2
done
python3 - "$start" "$rotated" "$now" "${#nodes[@]}" "$window" <<'PY'
import sys
start, rotated, done, n, window = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
print(f"ca rotate-intermediate (new RSA-4096 intermediate, published): {rotated-start:.2f} s")
print(f"spread window: {window}; whole fleet ({n} agents) on the new intermediate after {done-start:.2f} s")
PY
