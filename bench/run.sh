#!/usr/bin/env bash
# run.sh - kvm_exporter beside its peers and the C floor, in one run, at 0/1,000/10,000 extra
# idle processes; prints one table with ratios (bench/README.md explains every column).
#
# Phase 1: ../shared/bench/peers.sh (copied into the output folder: nothing is written into the
#   shared tree) with two extra tools: kvm_scrape0 = kvm_exporter with `interval: 0` (collects
#   on every scrape, so its CPU per scrape is its CPU per poll, measured like the peers'), and
#   kvm = kvm_exporter on its defaults (background poll every 15 s).
# Phase 2, per N, with the same idle processes (idlekids.c): floor.c -s and floor.c in-process,
#   bench/poll_cpu.py (CPU per poll in-process, the floor's method), then kvm_exporter on its
#   defaults scraped by wrk with 1 and 16 connections (bench/scrape_latency.py); RSS after.
# Phase 3: bench/freebsd_aggregate.py (fake libkvm, 10,000 and 100,000 records).
#
# Usage: bench/run.sh [--ns "0 1000 10000"] [--out DIR]
# Environment: KVM_EXPORTER (kvm_exporter on PATH), PYTHON (the python beside it),
#   SHARED_BENCH (../shared/bench from the repo), LATENCY_SECS (16, one poll at least).
# Needs: root for idle processes under two uids (else they all run as you), cc, wrk, curl, jq,
#   hyperfine, prometheus-node-exporter, prometheus-process-exporter (apt-get install).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
NS="0 1000 10000"
OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --ns) NS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
KVM=${KVM_EXPORTER:-$(command -v kvm_exporter)} || { echo "run.sh: no kvm_exporter" >&2; exit 2; }
PY=${PYTHON:-$(dirname "$KVM")/python}
SHARED=${SHARED_BENCH:-$HERE/../../shared/bench}
LATENCY_SECS=${LATENCY_SECS:-16}
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/kvm-bench.XXXXXX)
mkdir -p "$OUT/shared" && OUT=$(cd "$OUT" && pwd)
cp "$SHARED"/{peers.sh,floor.c,idlekids.c,pe-comm.yml,pe-user.yml} "$OUT/shared/"
printf 'interval: 0\n' > "$OUT/scrape0.yml"
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

log "phase 1: peers.sh -> $OUT/peers"
"$OUT/shared/peers.sh" --ns "$NS" --out "$OUT/peers" \
  --tool "kvm_scrape0=$KVM --web.listen-address=127.0.0.1:{port} --config.file $OUT/scrape0.yml" \
  --tool "kvm=$KVM --web.listen-address=127.0.0.1:{port}" > "$OUT/peers.log" 2>&1 \
  || log "peers.sh failed: see $OUT/peers.log"

FLOOR=$OUT/shared/.build/floor IDLE=$OUT/shared/.build/idlekids
CUR=""
stop() {  # PID: TERM, wait, reap
  [ -n "$1" ] || return 0
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null; wait "$1" 2>/dev/null; return 0
}
trap 'stop "$CUR"; stop "${IDLE_PID:-}"' EXIT
if [ "$(id -u)" = 0 ]; then UIDS=0,65534; else UIDS=$(id -u); fi

exporter() {  # NAME PORT COMMAND...: start, wait for /metrics, latency, RSS -> NAME.json
  local name=$1 port=$2; shift 2
  setpriv --pdeathsig KILL -- "$@" --web.listen-address "127.0.0.1:$port" > "$OUT/$tag-$name.log" 2>&1 &
  CUR=$!
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/metrics" && break; sleep 0.1; done
  "$PY" "$HERE/scrape_latency.py" --seconds "$LATENCY_SECS" "http://127.0.0.1:$port/metrics" \
    > "$OUT/$tag-$name.latency.json"
  awk '/^VmRSS|^VmHWM/ {printf "%s %.1f\n", $1, $2 / 1024}' "/proc/$CUR/status" > "$OUT/$tag-$name.rss"
  stop "$CUR"; CUR=""
}

for n in $NS; do
  tag=N$n
  log "phase 2: N=$n"
  IDLE_PID=""
  if [ "$n" -gt 0 ]; then
    setpriv --pdeathsig KILL -- "$IDLE" "$n" "$OUT/idle.pids" 3600 "$UIDS" > "$OUT/idle.out" 2>&1 &
    IDLE_PID=$!
    for _ in $(seq 1200); do grep -q '^ready' "$OUT/idle.out" 2>/dev/null && break; sleep 0.1; done
    sleep 2
  fi
  { "$FLOOR" 20 -s; "$FLOOR" 20; } > "$OUT/$tag-floor.txt"
  "$PY" "$HERE/poll_cpu.py" > "$OUT/$tag-poll.json"
  exporter kvm 19180 "$KVM"
  stop "$IDLE_PID"; IDLE_PID=""
done

log "phase 3: FreeBSD path (fake libkvm)"
(cd "$HERE/.." && "$PY" "$HERE/freebsd_aggregate.py") > "$OUT/freebsd.jsonl" 2> "$OUT/freebsd.log" \
  || log "freebsd_aggregate.py failed: see $OUT/freebsd.log"

"$PY" "$HERE/report.py" "$OUT" | tee "$OUT/report.md"
