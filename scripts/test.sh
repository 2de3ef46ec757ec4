#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property, integration (moto)
# and end-to-end (Prometheus) tests, then smoke runs of the demo, single and sharded.
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
scripts/demo.sh --sharded --check --bin-dir target/debug
