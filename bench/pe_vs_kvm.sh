#!/bin/bash
# pe_vs_kvm.sh - one run, same host: process-exporter grouping by user (../shared/bench/pe-user.yml)
# and kvm_exporter (interval 0: a poll per scrape): CPU per scrape, RSS, and per-user
# processes, memory and CPU side by side (issue 13). Start the load first (idlekids).
# Env: KVM_PYTHON (python of a venv with kvm_exporter), PE_CONFIG, OUT (default $OUT).
set -u
KVM_PYTHON=${KVM_PYTHON:-/opt/venv-usage/bin/python}
PE_CONFIG=${PE_CONFIG:-/work/shared/bench/pe-user.yml}
OUT=${OUT:-$OUT}
mkdir -p "$OUT"
PE_PORT=19291; KVM_PORT=19292
setpriv --pdeathsig KILL prometheus-process-exporter -config.path "$PE_CONFIG" -web.listen-address 127.0.0.1:$PE_PORT >"$OUT/pe.log" 2>&1 &
PE=$!
printf 'interval: 0\n' > "$OUT/kvm.yml"
setpriv --pdeathsig KILL "$KVM_PYTHON" -m kvm_exporter --config.file="$OUT/kvm.yml" --web.listen-address=127.0.0.1:$KVM_PORT >"$OUT/kvm.log" 2>&1 &
KVM=$!
for _ in $(seq 120); do curl -sf -o /dev/null 127.0.0.1:$PE_PORT/metrics && curl -sf -o /dev/null 127.0.0.1:$KVM_PORT/metrics && break; sleep 1; done
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
for who in PE KVM; do
  pid=${!who}; port=$([ $who = PE ] && echo $PE_PORT || echo $KVM_PORT)
  curl -s "127.0.0.1:$port/metrics" >/dev/null; curl -s "127.0.0.1:$port/metrics" >/dev/null
  n=$([ $who = PE ] && echo 5 || echo 20)
  a=$(cpu "$pid"); for _ in $(seq "$n"); do curl -sf "127.0.0.1:$port/metrics" > "$OUT/$who.prom"; done; b=$(cpu "$pid")
  echo "$who cpu_ms_per_scrape=$(( (b-a)*10/n )) rss_kib=$(awk '/VmRSS/{print $2}' "/proc/$pid/status") hwm_kib=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")"
done
# side by side, scraped back to back
curl -s 127.0.0.1:$PE_PORT/metrics > "$OUT/PE.prom"; curl -s 127.0.0.1:$KVM_PORT/metrics > "$OUT/KVM.prom"
grep -E '^namedprocess_namegroup_num_procs|^namedprocess_namegroup_memory_bytes\{groupname="[^"]*",memtype="(resident|virtual)"\}|^namedprocess_namegroup_cpu_seconds_total' "$OUT/PE.prom"
grep -E '^kvm_group_processes|^kvm_resident_memory_bytes|^kvm_virtual_memory_bytes|^kvm_cpu_seconds_total' "$OUT/KVM.prom"
# CPU over the same ~20 s window: kvm's counters and pe's, per user, scraped back to back
curl -sf 127.0.0.1:$KVM_PORT/metrics > "$OUT/K0.prom"; curl -sf 127.0.0.1:$PE_PORT/metrics > "$OUT/P0.prom"
sleep 20
curl -sf 127.0.0.1:$KVM_PORT/metrics > "$OUT/K1.prom"; curl -sf 127.0.0.1:$PE_PORT/metrics > "$OUT/P1.prom"
kill $PE $KVM
