#!/usr/bin/env bash
# Produce and consume through each client into one broker (flush = "async"), next to NATS
# JetStream (file storage) publishing the same 1 KiB messages with acks, in the same run.
# Each figure is the median of several runs; next to each rate, the CPU time the server
# (the broker, or nats-server) spent per message, which the machine's noise moves less.
# Usage: scripts/bench-clients.sh [runs]   (default 3). Needs `nats-server` on the PATH
# (Debian: apt install nats-server) for the NATS rows. The broker keeps its data in
# ./target/bench-clients (removed at the end) and listens on 127.0.0.1:18183; nats-server
# on 127.0.0.1:18222.
set -euo pipefail
runs=${1:-3}
cd "$(dirname "$0")/.."
cargo build --release -p ferrumq-broker -p ferrumq-benches
bench=target/release/ferrumq-bench
data=target/bench-clients
rm -rf "$data" && mkdir -p "$data/broker" "$data/nats"
printf 'flush = "async"\n' > "$data/async.toml"
pids=()
# Stop the servers and drop their data (several GB per run) on the way out.
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
target/release/ferrumq-broker --config "$data/async.toml" --data-dir "$data/broker" \
  --grpc-listen 127.0.0.1:18183 --http-listen 127.0.0.1:18182 >/dev/null 2>&1 & pids+=($!)
broker_pid=$!
if command -v nats-server >/dev/null; then
  nats-server -js -sd "$data/nats" -a 127.0.0.1 -p 18222 >/dev/null 2>&1 & pids+=($!)
  nats_pid=$!
fi
sleep 2
kill -0 "$broker_pid" 2>/dev/null || { echo "the broker did not start (is 127.0.0.1:18183 taken?)" >&2; exit 1; }

median() { sort -n | awk '{a[NR]=$1} END {printf "%.0f\n", a[int((NR+1)/2)]}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
# CPU time (user + system, in clock ticks) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # name server-pid args...   Also reports the server's CPU time per message.
  local name=$1 pid=$2; shift 2
  local rates=() mbs=() cpus=()
  for _ in $(seq "$runs"); do
    local json before
    before=$(cpu_ticks "$pid")
    json=$("$bench" "$@" --format json 2>/dev/null | grep '^{')
    rates+=("$(field messages_per_sec <<<"$json")")
    mbs+=("$(field mb_per_sec <<<"$json")")
    cpus+=("$(python3 -c "import sys; print(($(cpu_ticks "$pid") - $before) * 1e6 / $(getconf CLK_TCK) / $(field messages <<<"$json"))")")
  done
  printf '%-62s %8s msg/s %5s MB/s %6s server CPU ns/msg\n' "$name" \
    "$(printf '%s\n' "${rates[@]}" | median)" "$(printf '%s\n' "${mbs[@]}" | median)" \
    "$(printf '%s\n' "${cpus[@]}" | awk '{print $1 * 1000}' | median)"
}
ep=(--endpoint 127.0.0.1:18183)

echo "== produce 1 KiB, acked (median of $runs)"
if command -v nats-server >/dev/null; then
  run "NATS JetStream, file storage, 64 publishes in flight"        "$nats_pid" nats --server 127.0.0.1:18222 --count 200000 --concurrency 64
fi
run "ferrumq-client send(), 64 concurrent, 4 shared requests"      "$broker_pid" produce "${ep[@]}" --client native --count 200000 --concurrency 64 --requests 4
run "ferrumq-client send_batch(128), 8 concurrent"                 "$broker_pid" produce "${ep[@]}" --client native --count 800000 --concurrency 8 --batch 128
run "raw v2 requests of 128, 8 in flight"                          "$broker_pid" produce "${ep[@]}" --count 800000 --concurrency 8 --batch 128
run "official rocketmq 5.0.0 send(), 64 concurrent"                "$broker_pid" produce "${ep[@]}" --topic official --client official --count 50000 --concurrency 64
echo "== consume the backlog: receive B, ack them in one request, 8 concurrent (median of $runs)"
run "ferrumq-client SimpleConsumer receive 32 + ack_all"            "$broker_pid" consume "${ep[@]}" --client native --group native --count 400000 --concurrency 8 --batch 32
run "ferrumq-client SimpleConsumer receive 512 + ack_all"           "$broker_pid" consume "${ep[@]}" --client native --group native512 --count 800000 --concurrency 8 --batch 512
run "raw v2 receive 32 + ack"                                      "$broker_pid" consume "${ep[@]}" --group raw --count 400000 --concurrency 8 --batch 32
echo "== read the log by offset: PullMessage of 1024 per queue, no leases or acks (median of $runs)"
run "ferrumq-client BroadcastConsumer, pull_batch(1024)"           "$broker_pid" consume "${ep[@]}" --client native --pull --group broadcast --count 800000 --batch 1024
run "raw v2 pull 1024, one pull in flight per queue"               "$broker_pid" consume "${ep[@]}" --pull --group pull --count 800000 --batch 1024
