#!/usr/bin/env bash
# Broker benchmarks over gRPC on this machine, next to the ceiling a no-op gRPC server gives the
# same client in the same session. Each figure is the median of several runs.
# Usage: scripts/bench-broker.sh [runs]   (default 3). Brokers keep their data in
# ./target/bench-broker (removed at the end) and listen on 127.0.0.1:18081 (sync), :18083 (async), :18091 (no-op).
set -euo pipefail
runs=${1:-3}
cd "$(dirname "$0")/.."
cargo build --release -p ferrumq-broker -p ferrumq-benches
bench=target/release/ferrumq-bench
data=target/bench-broker
rm -rf "$data" && mkdir -p "$data/sync" "$data/async"
printf 'flush = "async"\n' > "$data/async.toml"
pids=()
# Stop the servers and drop their data (several GB per run) on the way out.
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
"$bench" null-server --listen 127.0.0.1:18091 & pids+=($!)
target/release/ferrumq-broker --data-dir "$data/sync" --grpc-listen 127.0.0.1:18081 --http-listen 127.0.0.1:18080 >/dev/null 2>&1 & pids+=($!)
target/release/ferrumq-broker --config "$data/async.toml" --data-dir "$data/async" --grpc-listen 127.0.0.1:18083 --http-listen 127.0.0.1:18082 >/dev/null 2>&1 & pids+=($!)
sleep 2

median() { sort -n | awk '{a[NR]=$1} END {printf "%.0f\n", a[int((NR+1)/2)]}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
run() { # name field args...
  local name=$1 key=$2; shift 2
  local values=()
  for _ in $(seq "$runs"); do
    values+=("$("$bench" "$@" --format json 2>/dev/null | grep '^{' | field "$key")")
  done
  printf '%-58s %s\n' "$name" "$(printf '%s\n' "${values[@]}" | median)"
}

echo "== ceiling: no-op gRPC server, same client (median of $runs)"
run "no-op, 1 msg/request, 64 in flight, msg/s"        messages_per_sec produce --endpoint 127.0.0.1:18091 --count 100000 --concurrency 64
run "no-op, 32 msg/request, 16 in flight, msg/s"       messages_per_sec produce --endpoint 127.0.0.1:18091 --count 1000000 --concurrency 16 --batch 32
run "no-op, official client, 64 in flight, msg/s"      messages_per_sec produce --endpoint 127.0.0.1:18091 --count 50000 --concurrency 64 --client official
echo "== ferrumq (median of $runs)"
run "official client, sync, 64 in flight, msg/s"       messages_per_sec produce --endpoint 127.0.0.1:18081 --topic official --count 50000 --concurrency 64 --client official
run "ferrumq-bench, async, 1 msg/request, 64, msg/s"   messages_per_sec produce --endpoint 127.0.0.1:18083 --count 100000 --concurrency 64
run "ferrumq-bench, sync, 1 msg/request, 64, msg/s"    messages_per_sec produce --endpoint 127.0.0.1:18081 --count 100000 --concurrency 64
run "ferrumq-bench, sync, 1 msg/request, 64, p99 us"   latency_p99_us produce --endpoint 127.0.0.1:18081 --count 100000 --concurrency 64
run "ferrumq-bench, async, 32 msg/request, 16, msg/s"  messages_per_sec produce --endpoint 127.0.0.1:18083 --count 1000000 --concurrency 16 --batch 32
run "ferrumq-bench, sync, 32 msg/request, 16, msg/s"   messages_per_sec produce --endpoint 127.0.0.1:18081 --count 1000000 --concurrency 16 --batch 32
run "e2e sync, 2,000 msg/s, p50 us"                    latency_p50_us e2e --endpoint 127.0.0.1:18081 --topic e2e --group e2e --count 10000 --rate 2000 --concurrency 2 --batch 32
run "e2e sync, 2,000 msg/s, p99 us"                    latency_p99_us e2e --endpoint 127.0.0.1:18081 --topic e2e --group e2e --count 10000 --rate 2000 --concurrency 2 --batch 32
# A fresh backlog of 100,000 per run, then drain it.
for i in $(seq "$runs"); do "$bench" produce --endpoint 127.0.0.1:18081 --topic backlog$i --count 100000 --concurrency 16 --batch 32 --format json >/dev/null 2>&1; done
values=()
for i in $(seq "$runs"); do
  values+=("$("$bench" consume --endpoint 127.0.0.1:18081 --topic backlog$i --group drain --count 100000 --concurrency 4 --batch 32 --format json 2>/dev/null | grep '^{' | field messages_per_sec)")
done
printf '%-58s %s\n' "consume 100,000 backlog, receive 32 + ack, sync, msg/s" "$(printf '%s\n' "${values[@]}" | median)"
