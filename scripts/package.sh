#!/usr/bin/env bash
# zonemesh: build the Debian packages zonemesh-controller and zonemesh-agent with cargo-deb.
#
#   scripts/package.sh            release build, stripped binaries (the packages to ship)
#   scripts/package.sh --debug    package the existing debug build instead, without building
#                                 (fast: what tests/tests/packaging.rs uses; the binaries
#                                 are stripped all the same)
#
# Man pages and shell completions come from the binaries' own clap definitions
# (`generate-docs`). The .deb files land in <target>/debian/; their paths are printed last.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=release
case "${1:-}" in
  "") ;;
  --debug) mode=debug ;;
  *) echo "usage: $0 [--debug]" >&2; exit 2 ;;
esac

if ! command -v cargo-deb >/dev/null 2>&1; then
  echo "== installing cargo-deb"
  cargo install --locked cargo-deb@3.8.0
fi

target="${CARGO_TARGET_DIR:-$PWD/target}"
if [ "$mode" = release ]; then
  echo "== release build"
  cargo build --release --locked -p zonemesh-controller -p zonemesh-agent --bins
  profile=release
  fast=()
else
  for b in zonemesh-controller zonemesh-agent; do
    [ -x "$target/debug/$b" ] || { echo "$target/debug/$b missing: cargo build -p zonemesh-controller -p zonemesh-agent --bins" >&2; exit 1; }
  done
  # cargo-deb does not package the dev profile; give the debug binaries a profile directory
  # of their own (cargo-deb strips its copies, the build stays as it is).
  profile=pkgdebug
  # Lighter compression: these packages are for the test, not for shipping.
  fast=(--fast)
  mkdir -p "$target/$profile"
  cp -f "$target/debug/zonemesh-controller" "$target/debug/zonemesh-agent" "$target/$profile/"
fi

echo "== man pages and completions"
for b in controller agent; do
  out="packaging/generated/$b"
  rm -rf "$out"
  "$target/$profile/zonemesh-$b" generate-docs --out "$out"
  gzip -9n "$out"/man/*.1
done

echo "== packages"
debs=()
for p in zonemesh-controller zonemesh-agent; do
  deb=$(cargo deb --no-build --locked --profile "$profile" -p "$p" --output "$target/debian/" "${fast[@]}" | tail -n 1)
  debs+=("$deb")
done
printf '%s\n' "${debs[@]}"
