#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property, integration (moto)
# and end-to-end (Prometheus) tests, then a smoke run of the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export CARGO_PROFILE_DEV_DEBUG=0
export CARGO_TERM_COLOR=never
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo nextest run --locked --no-fail-fast
scripts/check-artifacts.sh
scripts/demo.sh --check
