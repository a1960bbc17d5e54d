#!/usr/bin/env bash
# The one test command (README): installs what the tests need, then runs every workspace test.
# Model-heavy tests run in release mode; the suite takes a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
# promtool lints the /metrics exposition (Debian package `prometheus`).
if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "note: promtool not found (apt-get install prometheus); the metrics lint will be skipped" >&2
  fi
fi
cargo test --release --workspace --locked
