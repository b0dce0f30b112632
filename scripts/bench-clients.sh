#!/usr/bin/env bash
# Produce and consume through each client into one broker (flush = "async"), next to NATS
# JetStream (file storage) publishing the same 1 KiB messages with acks, in the same run.
# Each figure is the median of several runs.
# Usage: scripts/bench-clients.sh [runs]   (default 3). Needs `nats-server` on the PATH
# (Debian: apt install nats-server) for the NATS rows. The broker keeps its data in
# ./target/bench-clients (removed at the end) and listens on 127.0.0.1:18183; nats-server on 127.0.0.1:18222.
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
if command -v nats-server >/dev/null; then
  nats-server -js -sd "$data/nats" -a 127.0.0.1 -p 18222 >/dev/null 2>&1 & pids+=($!)
fi
sleep 2

median() { sort -n | awk '{a[NR]=$1} END {printf "%.0f\n", a[int((NR+1)/2)]}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
run() { # name args...
  local name=$1; shift
  local rates=() mbs=()
  for _ in $(seq "$runs"); do
    local json
    json=$("$bench" "$@" --format json 2>/dev/null | grep '^{')
    rates+=("$(field messages_per_sec <<<"$json")")
    mbs+=("$(field mb_per_sec <<<"$json")")
  done
  printf '%-62s %8s msg/s %5s MB/s\n' "$name" "$(printf '%s\n' "${rates[@]}" | median)" \
    "$(printf '%s\n' "${mbs[@]}" | median)"
}
ep=(--endpoint 127.0.0.1:18183)

echo "== produce 1 KiB, acked (median of $runs)"
if command -v nats-server >/dev/null; then
  run "NATS JetStream, file storage, 64 publishes in flight"        nats --server 127.0.0.1:18222 --count 200000 --concurrency 64
fi
run "ferrumq-client send(), 64 concurrent, 4 shared requests"      produce "${ep[@]}" --client native --count 200000 --concurrency 64 --requests 4
run "ferrumq-client send_batch(128), 8 concurrent"                 produce "${ep[@]}" --client native --count 800000 --concurrency 8 --batch 128
run "raw v2 requests of 128, 8 in flight"                          produce "${ep[@]}" --count 800000 --concurrency 8 --batch 128
run "official rocketmq 5.0.0 send(), 64 concurrent"                produce "${ep[@]}" --topic official --client official --count 50000 --concurrency 64
echo "== consume the backlog: receive 32, ack them in one request, 8 concurrent (median of $runs)"
run "ferrumq-client SimpleConsumer receive + ack_all"               consume "${ep[@]}" --client native --group native --count 400000 --concurrency 8 --batch 32
run "raw v2 receive + ack"                                         consume "${ep[@]}" --group raw --count 400000 --concurrency 8 --batch 32
