#!/usr/bin/env bash
# The scale harness: builds release binaries (shard-sd, and the test tools
# synthetic-aws and scale-harness), then starts a synthetic Cloud Map of the
# requested size, moto for the lease table and R replicas on loopback, and prints
# a report (one JSON object with --json).
#
#   scripts/scale.sh [--services S] [--instances M] [--replicas R] [--slots N]
#                    [--churn PER_S] [--duration D] [--refresh D] [--max-rps N]
#                    [--registrations K] [--json] [--debug]
#
# --debug builds and runs debug binaries instead (CI runs a small size that way so
# the harness cannot rot without a release build). Other flags go to scale-harness
# as they are; see `scale-harness --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null

profile=release
args=()
for arg in "$@"; do
  case "$arg" in
    --debug) profile=debug ;;
    *) args+=("$arg") ;;
  esac
done

export CARGO_PROFILE_DEV_DEBUG=0
if [ "$profile" = release ]; then
  cargo build --release --locked --bin shard-sd --bin synthetic-aws --bin scale-harness >&2
else
  cargo build --locked --bin shard-sd --bin synthetic-aws --bin scale-harness >&2
fi
exec "target/$profile/scale-harness" --bin-dir "target/$profile" "${args[@]}"
