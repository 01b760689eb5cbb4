#!/usr/bin/env bash
# A zonemesh lab in network namespaces: one controller and three zones of two nodes each,
# joined by a bridge on the underlay 198.18.100.0/24; overlay 100.64.0.0/10. Root only.
#
#   scripts/mesh-lab.sh demo            start everything, show status and pings, clean up on Ctrl-C
#   scripts/mesh-lab.sh up | down       start / remove the lab
#   scripts/mesh-lab.sh ctl-stop | ctl-start | agent-stop NODE | agent-start NODE
#   scripts/mesh-lab.sh ctl-kill [2]    kill -9 controller A (or B); ctl-start / ctl-stop take 2 too
#   scripts/mesh-lab.sh enroll NODE ZONE   enroll and start one more node (namespace created)
#   scripts/mesh-lab.sh x NODE CMD...   run a command inside a node's namespace
#   scripts/mesh-lab.sh host NAME IP    a bare namespace on the underlay (no credentials)
#
# Env: PFX (namespace prefix, default zml), DIR (state, default /tmp/zonemesh-lab-$PFX),
#      LAB_ZONES (default "a b c"), LAB_NODES (nodes per zone, default "1 2"),
#      BIN (directory with zonemesh-controller and zonemesh-agent; default target/release
#      if built there, else target/debug), CTL_ARGS / AGENT_ARGS (extra arguments of
#      `serve` / `run`, e.g. AGENT_ARGS="--metrics-listen 127.0.0.1:9100"; LAB_CTL_ARGS is
#      read like CTL_ARGS, e.g. "--block-first 10s").
#      LAB_STORE (a --store URL, e.g. etcd://127.0.0.1:2379,127.0.0.1:2381,127.0.0.1:2383):
#      the controllers keep their data there and run in the calling namespace (where etcd's
#      loopback listeners are), joined to the hub's bridge by a veth holding their addresses.
#      LAB_CONTROLLERS=2 (needs LAB_STORE): controller B on 198.18.100.2 with data dir
#      $DIR/ctl2 holding only a copy of A's secrets/; agents enroll with --controller A,B.
set -euo pipefail
PFX=${PFX:-zml}
DIR=${DIR:-/tmp/zonemesh-lab-$PFX}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${BIN:-}" ]; then
  if [ -x "$ROOT/target/release/zonemesh-agent" ]; then BIN=$ROOT/target/release; else BIN=$ROOT/target/debug; fi
fi
CTL="$BIN/zonemesh-controller"
AGENT="$BIN/zonemesh-agent"
HUB="$PFX-hub"
CTL_IP=198.18.100.1
CTL2_IP=198.18.100.2
LAB_STORE=${LAB_STORE:-}
LAB_CONTROLLERS=${LAB_CONTROLLERS:-1}
case "$LAB_CONTROLLERS" in 1) CTL_ADDRS=$CTL_IP:7443 ;; 2) CTL_ADDRS=$CTL_IP:7443,$CTL2_IP:7443 ;;
  *) echo "mesh-lab: LAB_CONTROLLERS is 1 or 2" >&2; exit 64 ;; esac
[ "$LAB_CONTROLLERS" = 1 ] || [ -n "$LAB_STORE" ] || { echo "mesh-lab: LAB_CONTROLLERS=2 needs LAB_STORE (a shared store)" >&2; exit 64; }
# LAB_ZONES / LAB_NODES shrink the lab (e.g. LAB_ZONES="a b" LAB_NODES=1: two agents).
read -ra ZONES <<< "${LAB_ZONES:-a b c}"
read -ra NODES <<< "${LAB_NODES:-1 2}"
read -ra CTL_EXTRA <<< "${CTL_ARGS:-} ${LAB_CTL_ARGS:-}"
read -ra AGENT_EXTRA <<< "${AGENT_ARGS:-}"

die() { echo "mesh-lab: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces and TUN)"

ns_of() { echo "$PFX-$1"; }
zone_index() { case "$1" in a) echo 1;; b) echo 2;; c) echo 3;; d) echo 4;; *) die "unknown zone $1";; esac; }
# Underlay address of node "<zone><n>", e.g. a1 -> 198.18.100.11
ul_of() { local z=${1:0:1} n=${1:1}; echo "198.18.100.$(( $(zone_index "$z") * 10 + n ))"; }
ctl() { "$CTL" --data-dir "$DIR/ctl" "$@"; }

add_host_ns() { # name ip
  local ns; ns=$(ns_of "$1")
  ip netns add "$ns"
  ip link add "v$PFX$1" type veth peer name eth0 netns "$ns"
  ip link set "v$PFX$1" netns "$HUB"
  ip -n "$HUB" link set "v$PFX$1" master br0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$2/24" dev eth0
  ip -n "$ns" link set eth0 up
}

ctl_start() { # [2]
  [ "${1:-1}" = 2 ] && { ctl2_start; return; }
  if [ -n "$LAB_STORE" ]; then
    "$CTL" --data-dir "$DIR/ctl" serve --grpc-listen "$CTL_IP:7443" \
      --https-listen "$CTL_IP:8443" --pki-listen "$CTL_IP:8089" --tls-name "$CTL_IP" \
      "${CTL_EXTRA[@]}" >>"$DIR/controller.log" 2>&1 &
  else
    ip netns exec "$HUB" "$CTL" --data-dir "$DIR/ctl" serve --grpc-listen "$CTL_IP:7443" \
      --https-listen "$CTL_IP:8443" --pki-listen "$CTL_IP:8089" --tls-name "$CTL_IP" \
      "${CTL_EXTRA[@]}" >>"$DIR/controller.log" 2>&1 &
  fi
  echo $! > "$DIR/controller.pid"
  for _ in $(seq 50); do [ -S "$DIR/ctl/admin.sock" ] && return 0; sleep 0.1; done
  die "controller did not start; see $DIR/controller.log"
}

# Controller B: the same store, its own data directory with a copy of A's secrets only.
ctl2_start() {
  [ "$LAB_CONTROLLERS" = 2 ] || die "no controller B (LAB_CONTROLLERS=2)"
  if [ ! -d "$DIR/ctl2/secrets" ]; then
    install -d -m 700 "$DIR/ctl2" "$DIR/ctl2/secrets"
    cp -p "$DIR/ctl/secrets/"* "$DIR/ctl2/secrets/"
  fi
  "$CTL" --data-dir "$DIR/ctl2" serve --store "$LAB_STORE" --grpc-listen "$CTL2_IP:7443" \
    --https-listen "$CTL2_IP:8443" --pki-listen "$CTL2_IP:8089" --tls-name "$CTL2_IP" \
    "${CTL_EXTRA[@]}" >>"$DIR/controller2.log" 2>&1 &
  echo $! > "$DIR/controller2.pid"
  for _ in $(seq 100); do [ -S "$DIR/ctl2/admin.sock" ] && return 0; sleep 0.1; done
  die "controller B did not start; see $DIR/controller2.log"
}

ctl_pidfile() { [ "${1:-1}" = 2 ] && echo "$DIR/controller2.pid" || echo "$DIR/controller.pid"; }

ctl_stop() { # [2]
  local pf; pf=$(ctl_pidfile "${1:-1}")
  [ -f "$pf" ] || return 0
  kill -TERM "$(cat "$pf")" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$(cat "$pf")" 2>/dev/null || break; sleep 0.1; done
  rm -f "$pf"
}

# kill -9: no clean shutdown (no lease revoked, no stream ended). The stale admin socket is
# removed so that a later ctl-start waits for the new one.
ctl_kill() { # [2]
  local pf; pf=$(ctl_pidfile "${1:-1}")
  [ -f "$pf" ] || return 0
  kill -KILL "$(cat "$pf")" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$(cat "$pf")" 2>/dev/null || break; sleep 0.1; done
  rm -f "$pf"
  if [ "${1:-1}" = 2 ]; then rm -f "$DIR/ctl2/admin.sock"; else rm -f "$DIR/ctl/admin.sock"; fi
}

agent_start() { # node
  local ns; ns=$(ns_of "$1")
  ip netns exec "$ns" "$AGENT" run --state-dir "$DIR/$1" --interface zm0 --listen-port 51820 \
    "${AGENT_EXTRA[@]}" >>"$DIR/$1.log" 2>&1 &
  echo $! > "$DIR/$1.pid"
  for _ in $(seq 50); do [ -S "$DIR/$1/agent.sock" ] && return 0; sleep 0.1; done
  die "agent $1 did not start; see $DIR/$1.log"
}

agent_stop() { # node
  [ -f "$DIR/$1.pid" ] || return 0
  kill -TERM "$(cat "$DIR/$1.pid")" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null || break; sleep 0.1; done
  rm -f "$DIR/$1.pid"
}

enroll() { # node zone
  local node=$1 zone=$2 ul token
  ul=$(ul_of "$node")
  ip netns list | grep -qw "$(ns_of "$node")" || add_host_ns "$node" "$ul"
  # LAB_TOKEN: enroll with a token made earlier (e.g. on a controller that is gone now).
  token=${LAB_TOKEN:-$(ctl token create --zone "zone-$zone" --ttl 10m | tail -1)}
  ip netns exec "$(ns_of "$node")" "$AGENT" enroll --controller "$CTL_ADDRS" \
    --ca-fingerprint "$(cat "$DIR/fingerprint")" --token "$token" --state-dir "$DIR/$node" \
    --name "$node" --zone "zone-$zone" --endpoint "$ul:51820"
  agent_start "$node"
}

up() {
  [ -x "$CTL" ] && [ -x "$AGENT" ] || die "binaries not found in $BIN (cargo build --release --bins)"
  ip netns list | grep -q "^$HUB" && die "lab $PFX already up (mesh-lab.sh down first)"
  mkdir -p "$DIR"
  ip netns add "$HUB"
  ip -n "$HUB" link set lo up
  # A fixed address: a bridge otherwise takes the lowest of its ports' addresses, so a
  # port added later (a host) could change it under the nodes' ARP caches and cut them off
  # from the controller until their entries expire.
  ip -n "$HUB" link add br0 address 02:00:c6:12:64:01 type bridge
  if [ -n "$LAB_STORE" ]; then
    # The controllers run here, next to the store: a veth from this namespace to the bridge.
    ip link add "c$PFX" type veth peer name "c$PFX" netns "$HUB"
    ip -n "$HUB" link set "c$PFX" master br0 up
    ip addr add "$CTL_IP/24" dev "c$PFX"
    [ "$LAB_CONTROLLERS" = 2 ] && ip addr add "$CTL2_IP/24" dev "c$PFX"
    ip link set "c$PFX" up
    ctl init --trust-domain lab.zonemesh.test --store "$LAB_STORE" | tail -1 > "$DIR/fingerprint"
  else
    ip -n "$HUB" addr add "$CTL_IP/24" dev br0
    ctl init --trust-domain lab.zonemesh.test | tail -1 > "$DIR/fingerprint"
  fi
  ip -n "$HUB" link set br0 up
  ctl_start
  [ "$LAB_CONTROLLERS" = 2 ] && ctl2_start
  local i=1
  for z in "${ZONES[@]}"; do ctl zone add "zone-$z" --cidr "100.64.$i.0/24" >/dev/null; i=$((i+1)); done
  for z in "${ZONES[@]}"; do for n in "${NODES[@]}"; do enroll "$z$n" "$z" >/dev/null; done; done
  echo "lab $PFX up: controller ${CTL_ADDRS//:7443/}, nodes ${ZONES[*]/%/1,2} (state in $DIR)"
}

down() {
  for p in "$DIR"/*.pid; do [ -f "$p" ] && { kill -TERM "$(cat "$p")" 2>/dev/null || true; }; done
  sleep 0.5
  for p in "$DIR"/*.pid; do [ -f "$p" ] && { kill -KILL "$(cat "$p")" 2>/dev/null || true; rm -f "$p"; }; done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$PFX-" || true); do ip netns del "$ns"; done
  rm -rf "$DIR"
}

overlay_of() { python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["overlay_ip"])' "$DIR/$1/identity.json"; }

demo() {
  trap 'echo; echo "cleaning up"; down; exit 0' INT TERM
  up
  echo "waiting for tunnels..."
  sleep 2
  for n in a1 b1 c1; do
    echo; echo "== zonemesh-agent status ($n)"
    ip netns exec "$(ns_of $n)" "$AGENT" status --state-dir "$DIR/$n"
  done
  echo
  for pair in "a1 b1" "b2 c1" "c2 a2"; do
    set -- $pair
    echo "== ping $1 -> $2 ($(overlay_of "$2"))"
    ip netns exec "$(ns_of "$1")" ping -c 3 -i 0.2 "$(overlay_of "$2")" | tail -2
  done
  echo; echo "nodes:"; ctl node list
  echo; echo "lab running; press Ctrl-C to stop and clean up"
  while true; do sleep 3600; done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  demo) demo ;;
  ctl-start) ctl_start "${2:-1}" ;;
  ctl-stop) ctl_stop "${2:-1}" ;;
  ctl-kill) ctl_kill "${2:-1}" ;;
  agent-start) agent_start "$2" ;;
  agent-stop) agent_stop "$2" ;;
  enroll) enroll "$2" "$3" ;;
  overlay) overlay_of "$2" ;;
  host) add_host_ns "$2" "$3" ;;
  x) n=$2; shift 2; ip netns exec "$(ns_of "$n")" "$@" ;;
  *) sed -n '2,22p' "$0"; exit 64 ;;
esac
