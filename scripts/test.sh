#!/usr/bin/env bash
# The one test command (README): installs what the tests need, then runs every test:
# the Rust workspace (model-heavy tests in release mode) and the Helm chart checks.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
./scripts/install-test-tools.sh
HELM="$PWD/.tools/bin/helm" PATH="$PWD/.tools/venv/bin:$PATH" .tools/venv/bin/python charts/tests/test_chart.py
cargo test --release --workspace --locked
