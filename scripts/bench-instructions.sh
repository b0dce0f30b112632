#!/usr/bin/env bash
# Instructions per message, counted by valgrind (callgrind): the same binary and workload
# give the same count whatever else the machine is doing, so two builds can be compared on a
# noisy machine where rates and CPU times move by ±20%. Counts user-space instructions only:
# page faults and system calls are not in them, and a `rep movsb` copy counts one per byte.
#
# Usage: scripts/bench-instructions.sh [broker-binary] [bench-binary]
# Runs the broker under callgrind (async flush), produces 40,000 messages of 1 KiB with
# `send_batch(128)` from the native client, then consumes them (receive 512 + `ack_all`), and
# prints the broker's instructions per message for each. Then it counts the load generator's
# own instructions per message, producing and consuming against a broker run natively.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ferrumq-broker -p ferrumq-benches
broker=${1:-target/release/ferrumq-broker}
bench=${2:-target/release/ferrumq-bench}
data=target/bench-instructions
n=40000
rm -rf "$data" && mkdir -p "$data"
printf 'flush = "async"\n' > "$data/async.toml"
pid=
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
ep=(--endpoint 127.0.0.1:18193)
start() { # [command to run the broker under...]
  rm -rf "$data/broker"
  "$@" "$broker" --config "$data/async.toml" --data-dir "$data/broker" \
    --grpc-listen 127.0.0.1:18193 --http-listen 127.0.0.1:18192 >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 120); do
    curl -sf 127.0.0.1:18192/readyz >/dev/null && return
    sleep 0.5
  done
  echo "the broker did not start (is 127.0.0.1:18193 taken?)" >&2
  exit 1
}
produce() { "$bench" produce "${ep[@]}" --client native --count "$1" --concurrency 8 --batch 128 --format json >/dev/null; }
consume() { "$bench" consume "${ep[@]}" --client native --group g --count "$1" --concurrency 8 --batch 512 --format json >/dev/null; }
total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'; }

# The broker: counters zeroed after a warm-up, dumped after each phase.
start valgrind --tool=callgrind --callgrind-out-file="$data/broker.out"
produce 2000
callgrind_control -z "$pid" >/dev/null 2>&1
produce "$n"
callgrind_control --dump=produce "$pid" >/dev/null 2>&1
callgrind_control -z "$pid" >/dev/null 2>&1
consume $((n + 2000))
callgrind_control --dump=consume "$pid" >/dev/null 2>&1
kill "$pid"; wait "$pid" 2>/dev/null || true
echo "broker, instructions per produced message: $(( $(total "$data/broker.out.1") / n ))"
echo "broker, instructions per consumed message: $(( $(total "$data/broker.out.2") / (n + 2000) ))"

# The load generator, against a broker run natively.
start env
produce "$n"
valgrind --tool=callgrind --callgrind-out-file="$data/consume.out" "$bench" consume "${ep[@]}" \
  --client native --group g --count "$n" --concurrency 8 --batch 512 --format json >/dev/null 2>&1
valgrind --tool=callgrind --callgrind-out-file="$data/produce.out" "$bench" produce "${ep[@]}" \
  --client native --count "$n" --concurrency 8 --batch 128 --format json >/dev/null 2>&1
echo "client, instructions per produced message: $(( $(total "$data/produce.out") / n ))"
echo "client, instructions per consumed message: $(( $(total "$data/consume.out") / n ))"
