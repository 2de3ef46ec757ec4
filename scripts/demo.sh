#!/usr/bin/env bash
# Local demo of the post's setup, on loopback only.
#
#   scripts/demo.sh [--sharded] [--check] [--port-base N] [--bin-dir DIR]
#
# Single replica (default):
#   moto (Cloud Map + SSM) <- shard-sd <- Prometheus -> sample-app x3 (127.0.0.2-4)
# --sharded: 3 shard slots coordinated through a DynamoDB lease table:
#   moto (Cloud Map + SSM + DynamoDB) <- shard-sd r1..r4 (3 slots + 1 standby)
#   <- one vmagent per replica -> VictoriaMetrics; sample-app x6 (127.0.0.2-7)
#
# --port-base N  ports on 127.0.0.1 (default 9000): moto N+50; shard-sd N+1 (single),
#                replica rK N+2K-1 (http_sd, status) and N+2K (peers); Prometheus
#                or VictoriaMetrics N+90; the vmagent of rK N+20+K. The sample apps
#                listen on 3000 and 9779 of their own address. A port already in use
#                stops the demo before it starts anything.
# --bin-dir DIR  take shard-sd and sample-app from DIR instead of building them
#                (`cargo build --bins`, target/debug).
# --check        wait until every target is scraped, print the result and stop
#                (exit 0; non-zero on failure). Used by scripts/test.sh.
#
# Logs and data go to .demo/. Ctrl-C stops everything it started.
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."

usage() { sed -n '2,22s/^# \{0,1\}//p' "$0"; }
fail_usage() { echo "demo: $1 (see scripts/demo.sh --help)" >&2; exit 2; }

CHECK=0 SHARDED=0 BASE=9000 BIN=
while [ $# -gt 0 ]; do
  case "$1" in
    --check) CHECK=1 ;;
    --sharded) SHARDED=1 ;;
    --port-base) [ $# -ge 2 ] || fail_usage "--port-base needs a number"; BASE=$2; shift ;;
    --port-base=*) BASE=${1#*=} ;;
    --bin-dir) [ $# -ge 2 ] || fail_usage "--bin-dir needs a directory"; BIN=$2; shift ;;
    --bin-dir=*) BIN=${1#*=} ;;
    -h | --help) usage; exit 0 ;;
    *) fail_usage "unknown argument $1" ;;
  esac
  shift
done
if ! [[ $BASE =~ ^[0-9]+$ ]] || [ "$BASE" -lt 1024 ] || [ "$BASE" -gt 65435 ]; then
  fail_usage "--port-base must be a number from 1024 to 65435, not '$BASE'"
fi
if [ -n "$BIN" ]; then
  dir=$BIN
  BIN=$(cd "$here" && cd "$dir" 2>/dev/null && pwd) || fail_usage "--bin-dir: no directory $dir"
  for b in shard-sd sample-app; do
    [ -x "$BIN/$b" ] || fail_usage "--bin-dir: no executable $BIN/$b"
  done
fi

WORK=.demo
MOTO_PORT=$((BASE + 50))
BACKEND_PORT=$((BASE + 90)) # Prometheus, or VictoriaMetrics with --sharded
SLOTS=3
if [ "$SHARDED" = 1 ]; then
  IPS=(127.0.0.2 127.0.0.3 127.0.0.4 127.0.0.5 127.0.0.6 127.0.0.7)
  REPLICAS=(r1 r2 r3 r4) # r4 comes last and stays a standby
else
  IPS=(127.0.0.2 127.0.0.3 127.0.0.4)
  REPLICAS=(r1)
fi
TARGETS=$((2 * ${#IPS[@]})) # an application and an exporter target per instance
sd_port() { echo $((BASE + 2 * ${1#r} - 1)); }
peer_port() { echo $((BASE + 2 * ${1#r})); }
agent_port() { echo $((BASE + 20 + ${1#r})); }

# Every address the demo listens on, checked before anything starts.
if [ "$SHARDED" = 1 ]; then
  wanted=("127.0.0.1:$MOTO_PORT=moto (Cloud Map, SSM, DynamoDB)" "127.0.0.1:$BACKEND_PORT=VictoriaMetrics")
  for r in "${REPLICAS[@]}"; do
    wanted+=("127.0.0.1:$(sd_port "$r")=shard-sd replica $r (http_sd, status)"
      "127.0.0.1:$(peer_port "$r")=shard-sd replica $r (peer listener)"
      "127.0.0.1:$(agent_port "$r")=vmagent of replica $r")
  done
else
  wanted=("127.0.0.1:$MOTO_PORT=moto (Cloud Map, SSM)" "127.0.0.1:$BACKEND_PORT=Prometheus"
    "127.0.0.1:$(sd_port r1)=shard-sd (http_sd, status)")
fi
for ip in "${IPS[@]}"; do
  wanted+=("$ip:3000=sample-app $ip (application)" "$ip:9779=sample-app $ip (ECS exporter)")
done
# A bind with SO_REUSEADDR fails exactly when something listens there (on that
# address or on all of them); connections lingering in TIME_WAIT do not count.
taken=$(python3 - "${wanted[@]}" <<'PY'
import socket, sys
for spec in sys.argv[1:]:
    addr, what = spec.split("=", 1)
    host, port = addr.rsplit(":", 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, int(port)))
    except OSError as e:
        print(f"{addr}\t{what}\t{e.strerror}")
    finally:
        s.close()
PY
)
if [ -n "$taken" ]; then
  while IFS=$'\t' read -r addr what why; do
    port=${addr##*:} holder=
    if [ "$why" != "Address already in use" ]; then
      echo "demo: port $port on ${addr%:*}, wanted by $what, cannot be used: $why" >&2
      continue
    fi
    if command -v ss >/dev/null 2>&1; then
      holder=$(ss -ltnpH "sport = :$port" 2>/dev/null \
        | awk -v a="$addr" -v p=":$port" '$4 == a || $4 == "0.0.0.0" p || $4 == "*" p || $4 == "[::]" p' \
        | grep -o 'users:(("[^"]*",pid=[0-9]*' | head -1 \
        | sed 's/users:(("\([^"]*\)",pid=\([0-9]*\)/ by \1 (pid \2)/') || true
    fi
    echo "demo: port $port on ${addr%:*}, wanted by $what, is already in use$holder" >&2
  done <<<"$taken"
  echo "demo: nothing started; free the port(s), or move the demo's ports on 127.0.0.1 with --port-base N" >&2
  exit 1
fi

rm -rf "$WORK" && mkdir -p "$WORK"
if [ "$SHARDED" = 1 ]; then scripts/setup.sh demo --sharded; else scripts/setup.sh demo; fi
if [ -z "$BIN" ]; then
  echo "demo: building"
  CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-0} cargo build --quiet --bins
  BIN=target/debug
fi

PIDS=()
cleanup() {
  local pid alive
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  # A stopping replica serves its slot until a successor has it, up to 20 s; with
  # the whole cluster stopping there is none, so what is left after 3 s is killed.
  for _ in $(seq 1 30); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
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

status_field() { # replica, field of /v1/status
  curl -fsS "http://127.0.0.1:$(sd_port "$1")/v1/status" 2>/dev/null \
    | .venv/bin/python -c 'import json,sys; v=json.load(sys.stdin).get(sys.argv[1]); print("-" if v is None else v)' "$2" 2>/dev/null \
    || echo "?"
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

AWS_ENV=(AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
  AWS_EC2_METADATA_DISABLED=true AWS_ENDPOINT_URL="http://127.0.0.1:$MOTO_PORT")

run_single() {
  local sd_port
  sd_port=$(sd_port r1)
  env "${AWS_ENV[@]}" LISTEN_ADDR="127.0.0.1:$sd_port" CONFIG_RELOAD_FREQUENCY=5 \
    "$BIN/shard-sd" >"$WORK/shard-sd.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$sd_port/readyz" shard-sd

  cat >"$WORK/prometheus.yml" <<YAML
global:
  scrape_interval: 5s
  scrape_timeout: 4s
scrape_configs:
  - job_name: ecs_services
    http_sd_configs:
      - url: http://127.0.0.1:$sd_port/prometheus-targets
        refresh_interval: 10s
YAML
  prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/prometheus-data" \
    --web.listen-address="127.0.0.1:$BACKEND_PORT" >"$WORK/prometheus.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$BACKEND_PORT/-/ready" prometheus

  cat <<TXT

shard-sd demo is running (logs in $WORK/):
  targets (http_sd):   http://127.0.0.1:$sd_port/prometheus-targets
  status:              http://127.0.0.1:$sd_port/v1/status
  Prometheus targets:  http://127.0.0.1:$BACKEND_PORT/targets
  request rate:        http://127.0.0.1:$BACKEND_PORT/graph?g0.expr=sum(rate(http_requests_total%5B1m%5D))
Register more instances with boto3 against http://127.0.0.1:$MOTO_PORT; Ctrl-C stops everything.
TXT

  [ "$CHECK" = 1 ] || return 0
  local up=0
  for _ in $(seq 1 60); do
    up=$(curl -fsS "http://127.0.0.1:$BACKEND_PORT/api/v1/query?query=count(up%3D%3D1)" \
      | .venv/bin/python -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)')
    if [ "$up" = "$TARGETS" ]; then
      echo "demo check: Prometheus scrapes $TARGETS targets through shard-sd, all up"
      exit 0
    fi
    sleep 1
  done
  echo "demo check failed: $up of $TARGETS targets up; see $WORK/*.log" >&2
  exit 1
}

start_replica() { # rN
  local r=$1
  env "${AWS_ENV[@]}" LEASE_TABLE=shard-sd-leases CREATE_TABLE=true SHARD_COUNT=$SLOTS \
    REPLICA_ID="$r" LISTEN_ADDR="127.0.0.1:$(sd_port "$r")" \
    PEER_LISTEN_ADDR="127.0.0.1:$(peer_port "$r")" ADVERTISE_ADDR="127.0.0.1:$(peer_port "$r")" \
    PEER_TOKEN=demo LEASE_DURATION=6s HEARTBEAT_INTERVAL=1s HANDOFF_GRACE=10s \
    CONFIG_RELOAD_FREQUENCY=5 "$BIN/shard-sd" >"$WORK/shard-sd-$r.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$WORK/shard-sd-$r.pid"
  wait_http "http://127.0.0.1:$(sd_port "$r")/readyz" "shard-sd $r"
}

run_sharded() {
  local r slot
  # One replica after the other, each once the previous one holds a slot, so
  # that r1 leads and r4, the fourth for three slots, is the standby.
  for r in "${REPLICAS[@]}"; do
    start_replica "$r"
    [ "${r#r}" -gt "$SLOTS" ] && break
    for _ in $(seq 1 150); do
      slot=$(status_field "$r" slot)
      [[ $slot =~ ^[0-9]+$ ]] && break
      sleep 0.2
    done
    if ! [[ $slot =~ ^[0-9]+$ ]]; then
      echo "demo: $r took no slot; see $WORK/shard-sd-$r.log" >&2
      exit 1
    fi
  done

  victoria-metrics -httpListenAddr="127.0.0.1:$BACKEND_PORT" -storageDataPath="$WORK/vm-data" \
    -retentionPeriod=1d -search.latencyOffset=1s >"$WORK/victoria-metrics.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$BACKEND_PORT/health" VictoriaMetrics

  for r in "${REPLICAS[@]}"; do
    # vmagent's http_sd_configs has no refresh_interval: -promscrape.httpSDCheckInterval sets it.
    cat >"$WORK/vmagent-$r.yml" <<YAML
global:
  scrape_interval: 5s
  scrape_timeout: 4s
scrape_configs:
  - job_name: ecs_services
    http_sd_configs:
      - url: http://127.0.0.1:$(sd_port "$r")/prometheus-targets
  # The replica's own metrics (shard_sd_*).
  - job_name: shard_sd
    static_configs:
      - targets: ["127.0.0.1:$(sd_port "$r")"]
YAML
    vmagent -promscrape.config="$WORK/vmagent-$r.yml" \
      -remoteWrite.url="http://127.0.0.1:$BACKEND_PORT/api/v1/write" -remoteWrite.label=collector="$r" \
      -remoteWrite.tmpDataPath="$WORK/vmagent-$r-data" -httpListenAddr="127.0.0.1:$(agent_port "$r")" \
      -promscrape.httpSDCheckInterval=5s >"$WORK/vmagent-$r.log" 2>&1 &
    PIDS+=($!)
  done
  for r in "${REPLICAS[@]}"; do wait_http "http://127.0.0.1:$(agent_port "$r")/health" "vmagent of $r"; done

  echo
  echo "shard-sd sharded demo is running (logs in $WORK/): $SLOTS slots, ${#REPLICAS[@]} replicas, $TARGETS targets"
  printf '  %-7s %-9s %-8s %-44s %-33s %s\n' replica role slot "shard (http_sd)" status "its vmagent's targets"
  for r in "${REPLICAS[@]}"; do
    printf '  %-7s %-9s %-8s %-44s %-33s %s\n' "$r" "$(status_field "$r" role)" "$(status_field "$r" slot)" \
      "http://127.0.0.1:$(sd_port "$r")/prometheus-targets" "http://127.0.0.1:$(sd_port "$r")/v1/status" \
      "http://127.0.0.1:$(agent_port "$r")/targets"
  done
  cat <<TXT
  VictoriaMetrics (all collectors write there, each series labelled collector=rN):
    query UI:  http://127.0.0.1:$BACKEND_PORT/vmui
    try:       count by (collector) (up{job="ecs_services"})
               count by (instance, metrics_source) (up{job="ecs_services"} == 1)
               shard_sd_shard_targets
Stop a slot holder (kill \$(cat $WORK/shard-sd-r2.pid)) and watch the standby r4 take its slot.
Register more instances with boto3 against http://127.0.0.1:$MOTO_PORT; Ctrl-C stops everything.
TXT

  [ "$CHECK" = 1 ] || return 0
  local verdict="" shards
  for _ in $(seq 1 120); do
    # Every target scraped by exactly one collector, up, no other copy of it anywhere,
    # and each collector scraping as many targets as its replica serves.
    shards=()
    for r in "${REPLICAS[@]}"; do shards+=("$r=$(status_field "$r" shard_targets)"); done
    verdict=$(.venv/bin/python - "http://127.0.0.1:$BACKEND_PORT" "$TARGETS" "${shards[@]}" <<'PY'
import json, sys, urllib.parse, urllib.request
base, expected = sys.argv[1], int(sys.argv[2])
shards = dict(arg.split("=", 1) for arg in sys.argv[3:])
def query(q):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]["result"]
try:
    up = query('count by (instance, metrics_source) (up{job="ecs_services"} == 1)')
    total = query('count(up{job="ecs_services"})')
    per = query('count by (collector) (up{job="ecs_services"} == 1)')
except Exception as e:
    print(f"wait backend not answering: {e}")
    sys.exit()
total = int(float(total[0]["value"][1])) if total else 0
twice = [f'{s["metric"].get("instance")}/{s["metric"].get("metrics_source")}'
         for s in up if s["value"][1] != "1"]
per = {s["metric"].get("collector"): s["value"][1] for s in per}
apart = [f"{r} scrapes {per.get(r, '0')} of {n}" for r, n in shards.items() if per.get(r, "0") != n]
per = ", ".join(f"{r}: {n}" for r, n in sorted(per.items()))
if len(up) == expected and not twice and total == expected and not apart:
    print(f"ok {expected} targets, each up on exactly one collector ({per})")
else:
    print(f"wait {len(up)} of {expected} targets up, {total} series of up, "
          f"scraped more than once: {' '.join(twice) or 'none'}, "
          f"collectors behind their shard: {', '.join(apart) or 'none'}")
PY
)
    if [ "${verdict%% *}" = ok ]; then
      echo "demo check: ${verdict#ok }"
      for r in "${REPLICAS[@]}"; do
        echo "  $r: $(status_field "$r" role), slot $(status_field "$r" slot), $(status_field "$r" shard_targets) targets in its shard"
      done
      exit 0
    fi
    sleep 1
  done
  echo "demo check failed: ${verdict#wait }; see $WORK/*.log" >&2
  exit 1
}

if [ "$SHARDED" = 1 ]; then run_sharded; else run_single; fi
wait
