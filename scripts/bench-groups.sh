#!/usr/bin/env bash
# Consume with many consumer groups at once beside one group: 64 groups, each on its own topic,
# against one group on one topic, with the same receivers (64), batch and total backlog. If
# groups waited on each other, 64 groups would go no faster than one. Each figure is the
# median of several runs (a fresh set of groups per run, reading from the start).
# Usage: scripts/bench-groups.sh [runs] [broker-binary]   (default 3 runs, this build's
# broker). The broker keeps its data in ./target/bench-groups (removed at the end) and
# listens on 127.0.0.1:18181.
set -euo pipefail
runs=${1:-3}
groups=64
per_topic=4000
cd "$(dirname "$0")/.."
cargo build --release -p ferrumq-broker -p ferrumq-benches
broker=${2:-target/release/ferrumq-broker}
bench=target/release/ferrumq-bench
data=target/bench-groups
ep=(--endpoint 127.0.0.1:18181)
rm -rf "$data" && mkdir -p "$data"
trap 'kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$data"' EXIT
"$broker" --data-dir "$data" --grpc-listen 127.0.0.1:18181 --http-listen 127.0.0.1:18180 >/dev/null 2>&1 &
pid=$!
sleep 2

median() { sort -n | awk '{a[NR]=$1} END {printf "%.0f\n", a[int((NR+1)/2)]}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
produce() { "$bench" produce "${ep[@]}" --topic "$1" --count "$2" --concurrency 16 --batch 64 --format json >/dev/null; }

for i in $(seq 0 $((groups - 1))); do produce "many-$i" "$per_topic"; done
produce one $((groups * per_topic))
total=$((groups * per_topic))
many=() one=()
for r in $(seq "$runs"); do
  many+=("$("$bench" consume "${ep[@]}" --topic many --group "many-r$r" --groups "$groups" --count "$total" --concurrency "$groups" --batch 32 --format json | grep '^{' | field messages_per_sec)")
  one+=("$("$bench" consume "${ep[@]}" --topic one --group "one-r$r" --count "$total" --concurrency "$groups" --batch 32 --format json | grep '^{' | field messages_per_sec)")
done
echo "== consume $total messages, $groups receivers, receive 32 + ack, sync (median of $runs)"
printf '%-48s %s\n' "one group on one topic, msg/s" "$(printf '%s\n' "${one[@]}" | median)"
printf '%-48s %s\n' "$groups groups on $groups topics at once, msg/s" "$(printf '%s\n' "${many[@]}" | median)"
