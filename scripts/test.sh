#!/usr/bin/env bash
# The one test command (README): installs what the tests need, then runs every workspace test.
# Model-heavy tests run in release mode; the whole suite stays well under 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (rustup.rs)" >&2; exit 1; }
cargo test --release --workspace --locked
