#!/usr/bin/env bash
# SSH certificate benchmarks: user certificates signed per second next to `ssh-keygen -s`
# with the same CA key type (Ed25519 and RSA-4096), and revocation -> refusal on every
# server of a six-node lab (three zones x two servers in network namespaces; root only).
#   sudo scripts/bench-ssh.sh          # 1000 certificates, 30 revocation rounds, six servers
#   sudo SMOKE=1 scripts/bench-ssh.sh  # 50 certificates, 3 rounds, two servers (CI)
#   sudo BIN=target-rel/release scripts/bench-ssh.sh   # the lab runs those binaries
# Signing runs in the bench process, dev profile (dependencies at opt-level 3, as for every
# benchmark here); the lab's controller and agents are the debug build unless BIN says.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${BIN:-}" ]; then
  export ZM_BIN_DIR; ZM_BIN_DIR=$(cd "$BIN" && pwd)
else
  cargo build --locked -p zonemesh-controller -p zonemesh-agent --bins
fi
exec cargo bench --locked --profile dev -p zonemesh-tests --bench ssh
