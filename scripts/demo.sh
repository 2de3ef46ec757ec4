#!/usr/bin/env bash
# Local demo of the post's setup, on loopback only:
#   moto (Cloud Map + SSM) <- shard-sd (:9001) <- Prometheus (:9090) -> sample-app x3 (127.0.0.2-4)
# Ctrl-C stops everything it started. `--check` waits until Prometheus scrapes all
# six targets, prints the result and stops (used by the test suite).
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1

MOTO_PORT=${DEMO_MOTO_PORT:-5000}
SD_PORT=${DEMO_SD_PORT:-9001}
PROM_PORT=${DEMO_PROM_PORT:-9090}
IPS=(127.0.0.2 127.0.0.3 127.0.0.4)
WORK=.demo
rm -rf "$WORK" && mkdir -p "$WORK"

scripts/setup.sh
echo "demo: building"
CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-0} cargo build --quiet --bins
BIN=target/debug

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() { # url, what
  for _ in $(seq 1 150); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "demo: $2 did not start; see $WORK/*.log" >&2
  exit 1
}

.venv/bin/moto_server -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$MOTO_PORT/moto-api/" moto
.venv/bin/python scripts/demo_setup.py "http://127.0.0.1:$MOTO_PORT" "${IPS[@]}"

for ip in "${IPS[@]}"; do
  "$BIN/sample-app" --listen "$ip:3000" --exporter-listen "$ip:9779" --load-rps 5 \
    >"$WORK/sample-app-$ip.log" 2>&1 &
  PIDS+=($!)
done

env AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 \
  AWS_EC2_METADATA_DISABLED=true AWS_ENDPOINT_URL="http://127.0.0.1:$MOTO_PORT" \
  LISTEN_ADDR="127.0.0.1:$SD_PORT" CONFIG_RELOAD_FREQUENCY=5 \
  "$BIN/shard-sd" >"$WORK/shard-sd.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$SD_PORT/readyz" shard-sd

cat >"$WORK/prometheus.yml" <<YAML
global:
  scrape_interval: 5s
  scrape_timeout: 4s
scrape_configs:
  - job_name: ecs_services
    http_sd_configs:
      - url: http://127.0.0.1:$SD_PORT/prometheus-targets
        refresh_interval: 10s
YAML
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prometheus-data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$PROM_PORT/-/ready" prometheus

cat <<TXT

shard-sd demo is running (logs in $WORK/):
  targets (http_sd):   http://127.0.0.1:$SD_PORT/prometheus-targets
  status:              http://127.0.0.1:$SD_PORT/v1/status
  Prometheus targets:  http://127.0.0.1:$PROM_PORT/targets
  request rate:        http://127.0.0.1:$PROM_PORT/graph?g0.expr=sum(rate(http_requests_total%5B1m%5D))
Register more instances with boto3 against http://127.0.0.1:$MOTO_PORT; Ctrl-C stops everything.
TXT

if [ "$CHECK" = 1 ]; then
  for _ in $(seq 1 60); do
    up=$(curl -fsS "http://127.0.0.1:$PROM_PORT/api/v1/query?query=count(up%3D%3D1)" \
      | .venv/bin/python -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)')
    if [ "$up" = 6 ]; then echo "demo check: Prometheus scrapes 6 targets through shard-sd, all up"; exit 0; fi
    sleep 1
  done
  echo "demo check failed: $up of 6 targets up; see $WORK/*.log" >&2
  exit 1
fi
wait
