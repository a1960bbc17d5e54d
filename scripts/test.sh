#!/usr/bin/env bash
# The one test command (README): installs what the tests need, then runs every test:
# the layout rules, the Helm chart checks, the Rust workspace (model-heavy tests in release mode)
# the server built without learning plugins, and the GPU build (`--features cuda`, CUDA from
# NVIDIA's PyPI wheels: it compiles on every change without a GPU; scripts/build-cuda.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
./scripts/install-test-tools.sh
python3 scripts/check-layout.py
HELM="$PWD/.tools/bin/helm" PATH="$PWD/.tools/venv/bin:$PATH" .tools/venv/bin/python charts/tests/test_chart.py
cargo test --release --workspace --locked
# The server with no learning plugin compiled in still builds, serves and records.
cargo test --release -p imagegen-server --no-default-features --locked --test binary
./scripts/build-cuda.sh
