#!/usr/bin/env bash
# bench-dataplane.sh — zonemesh data plane vs wireguard-go vs the raw veth underlay, all in
# the same run on the same namespace pair (../shared/tools/netns-pair.sh):
#   iperf3 TCP A->B with 1 and 4 streams, ping RTT, CPU seconds used by each daemon,
#   printed as a table with ratios against wireguard-go.
#
#   sudo scripts/bench-dataplane.sh            # SECS=10 per iperf3 run
#   sudo SMOKE=1 scripts/bench-dataplane.sh    # a few seconds per run (CI)
#
# Env: SECS (iperf3 seconds, default 10; 3 with SMOKE=1), PFX (namespace prefix, default
#      "zmb-"), MTU (tunnel MTU, default 1420), ZM_BIN (agent binary; default: release build
#      via cargo), SHARED (path of shared/tools, default ../shared/tools beside the repo),
#      KEEP=1 (leave the namespaces up).
# Needs root, iproute2, iperf3, iputils-ping, jq, bc, wireguard-go, wireguard-tools.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$REPO/../shared/tools}
export PFX=${PFX:-zmb-}
if [[ ${SMOKE:-0} == 1 ]]; then export SECS=${SECS:-3} PINGS=${PINGS:-10}; else export SECS=${SECS:-10}; fi
export MTU=${MTU:-1420}
[[ $(id -u) == 0 ]] || { echo "bench-dataplane.sh: needs root" >&2; exit 1; }
for t in ip iperf3 ping jq bc wg wireguard-go; do
  command -v "$t" >/dev/null || { echo "bench-dataplane.sh: $t not installed" >&2; exit 1; }
done
[[ -f $SHARED/netns-pair.sh && -f $SHARED/wg-go-bench.sh ]] || { echo "shared tools not found at $SHARED" >&2; exit 1; }

if [[ -z ${ZM_BIN:-} ]]; then
  (cd "$REPO" && cargo build --release -q -p zonemesh-agent)
  ZM_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/zonemesh-agent
fi
[[ -x $ZM_BIN ]] || { echo "agent binary $ZM_BIN missing" >&2; exit 1; }

# shellcheck source=/dev/null
source "$SHARED/netns-pair.sh"   # up, down, iperf_run, rtt, nsx, NS_A/NS_B, UL_A/UL_B
WORK=$(mktemp -d -t zmbench.XXXXXX)
ZM_PIDS=()
cleanup() {
  for p in "${ZM_PIDS[@]:-}"; do [[ -n $p ]] && kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  [[ ${KEEP:-0} == 1 ]] || down >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cpu_s() { awk '{printf "%.2f", ($14+$15)/100}' "/proc/$1/stat"; }   # utime+stime (USER_HZ=100)
avg_rtt() { echo "$1" | awk -F/ '{print $2}'; }
ratio() { if [[ -n $1 && -n $2 && $2 != 0 ]]; then echo "scale=2; $1 / $2" | bc; else echo "-"; fi; }

echo "== bench-dataplane: SECS=$SECS MTU=$MTU pair ${NS_A} <-> ${NS_B} ($(nproc) cores, kernel $(uname -r))"
down >/dev/null 2>&1 || true
up >/dev/null

# 1. raw veth underlay
echo "-- raw veth"
V1=$(iperf_run "$NS_A" "$UL_B" "$NS_B" 1); V4=$(iperf_run "$NS_A" "$UL_B" "$NS_B" 4)
VRTT=$(rtt "$NS_A" "$UL_B")
echo "   1: $V1  4: $V4  rtt: $VRTT"

# 2. wireguard-go (the shared anchor script), on the same pair
echo "-- wireguard-go"
KEEP=1 bash "$SHARED/wg-go-bench.sh" wg-go wg-go | tee "$WORK/wg.out" | sed 's/^/   /'
W1=$(awk '/1 stream/{print $3}' "$WORK/wg.out"); W4=$(awk '/4 stream/{print $3}' "$WORK/wg.out")
W1CPU=$(awk -F'A=| B=' '/1 stream/{print $2+$3}' "$WORK/wg.out")
W4CPU=$(awk -F'A=| B=' '/4 stream/{print $2+$3}' "$WORK/wg.out")
WRTT=$(awk -F': ' '/RTT tunnel/{print $2}' "$WORK/wg.out")

# 3. zonemesh agent, same addresses, same pair
echo "-- zonemesh ($ZM_BIN)"
umask 077
wg genkey >"$WORK/a.key"; wg pubkey <"$WORK/a.key" >"$WORK/a.pub"
wg genkey >"$WORK/b.key"; wg pubkey <"$WORK/b.key" >"$WORK/b.pub"
zm_config() { # key peer_pub peer_ul my_ip peer_ip ifname
  jq -n --arg k "$(cat "$1")" --arg p "$(cat "$2")" --arg ep "$3:51820" --arg me "$4/32" \
        --arg peer "$5/32" --arg ifn "$6" --argjson mtu "$MTU" \
    '{private_key:$k, listen_port:51820, interface:$ifn, address:$me, mtu:$mtu,
      peers:[{name:"bench/peer", public_key:$p, endpoint:$ep, allowed_ips:[$peer]}]}'
}
zm_config "$WORK/a.key" "$WORK/b.pub" "$UL_B" 100.64.0.1 100.64.0.2 "${PFX}za" >"$WORK/a.json"
zm_config "$WORK/b.key" "$WORK/a.pub" "$UL_A" 100.64.0.2 100.64.0.1 "${PFX}zb" >"$WORK/b.json"
ip netns exec "$NS_A" "$ZM_BIN" tunnel --config "$WORK/a.json" >"$WORK/a.log" 2>&1 & ZA=$!; ZM_PIDS+=("$ZA")
ip netns exec "$NS_B" "$ZM_BIN" tunnel --config "$WORK/b.json" >"$WORK/b.log" 2>&1 & ZB=$!; ZM_PIDS+=("$ZB")
ok=0
for _ in $(seq 30); do nsx "$NS_A" ping -c1 -W1 100.64.0.2 >/dev/null 2>&1 && { ok=1; break; }; sleep 0.2; done
if [[ $ok != 1 ]]; then echo "   zonemesh tunnel ping FAILED"; cat "$WORK"/a.log "$WORK"/b.log; exit 1; fi
grep -h "TUN device up\|UDP socket bound" "$WORK/a.log" | sed 's/\x1b\[[0-9;]*m//g; s/^/   /'
zm_run() { # streams -> "mbit retr cpu"
  local ca cb r
  ca=$(cpu_s "$ZA"); cb=$(cpu_s "$ZB")
  r=$(iperf_run "$NS_A" 100.64.0.2 "$NS_B" "$1")
  echo "$r $(echo "$(cpu_s "$ZA") - $ca + $(cpu_s "$ZB") - $cb" | bc)"
}
Z1=$(zm_run 1); Z4=$(zm_run 4)
ZRTT=$(rtt "$NS_A" 100.64.0.2)
echo "   1 stream: ${Z1% *} (Mbit/s retr) CPU s ${Z1##* }; 4 streams: ${Z4% *} CPU s ${Z4##* }; rtt: $ZRTT"
kill -TERM "$ZA" "$ZB"; wait "$ZA" "$ZB" 2>/dev/null || true; ZM_PIDS=()

Z1M=${Z1%% *}; Z4M=${Z4%% *}; Z1CPU=${Z1##* }; Z4CPU=${Z4##* }
printf '\n%-26s %12s %12s %12s %14s\n' "metric (same run)" "raw veth" "wireguard-go" "zonemesh" "zonemesh/wg-go"
printf '%-26s %12s %12s %12s %14s\n' "TCP 1 stream (Mbit/s)" "${V1%% *}" "$W1" "$Z1M" "$(ratio "$Z1M" "$W1")"
printf '%-26s %12s %12s %12s %14s\n' "TCP 4 streams (Mbit/s)" "${V4%% *}" "$W4" "$Z4M" "$(ratio "$Z4M" "$W4")"
printf '%-26s %12s %12s %12s %14s\n' "ping RTT avg (ms)" "$(avg_rtt "$VRTT")" "$(avg_rtt "$WRTT")" "$(avg_rtt "$ZRTT")" "$(ratio "$(avg_rtt "$ZRTT")" "$(avg_rtt "$WRTT")")"
printf '%-26s %12s %12s %12s %14s\n' "daemon CPU s, 1 stream" "-" "$W1CPU" "$Z1CPU" "$(ratio "$Z1CPU" "$W1CPU")"
printf '%-26s %12s %12s %12s %14s\n' "daemon CPU s, 4 streams" "-" "$W4CPU" "$Z4CPU" "$(ratio "$Z4CPU" "$W4CPU")"
printf '%-26s %12s %12s %12s %14s\n' "Mbit per CPU s, 1 stream" "-" \
  "$(ratio "$(echo "$W1 * $SECS" | bc)" "$W1CPU")" "$(ratio "$(echo "$Z1M * $SECS" | bc)" "$Z1CPU")" "-"
