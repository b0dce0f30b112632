#!/usr/bin/env bash
# Storage benchmarks next to this machine's own limits, each run several times (medians).
# Usage: scripts/bench-storage.sh [runs]   (default 3). Writes into ./target/bench-data.
set -euo pipefail
runs=${1:-3}
cd "$(dirname "$0")/.."
cargo build --release -p ferrumq-benches
bench=target/release/ferrumq-bench
data=target/bench-data
mkdir -p "$data"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
run() { # name field args...
  local name=$1 key=$2; shift 2
  local values=()
  for _ in $(seq "$runs"); do values+=("$("$bench" "$@" --dir "$data" --format json | field "$key")"); done
  printf '%-44s %s\n' "$name" "$(printf '%s\n' "${values[@]}" | median)"
}

echo "== machine limits (median of $runs)"
"$bench" machine --runs "$runs" --dir "$data"
echo "== storage (median of $runs runs each)"
run "async 1 KiB, 0.9 GB (one segment), MB/s" mb_per_s storage --flush async --size 1024 --count 900000 --writers 2
run "async 1 KiB, 2.2 GB, MB/s"             mb_per_s storage --flush async --size 1024 --count 2000000 --writers 2
run "sync 64 writers 1 KiB, records/s"      messages_per_s storage --flush sync --size 1024 --count 300000 --writers 64
run "sync 64 writers 1 KiB, records/fsync"  records_per_fsync storage --flush sync --size 1024 --count 300000 --writers 64
run "sync 1024 writers 1 KiB, MB/s"         mb_per_s storage --flush sync --size 1024 --count 300000 --writers 1024
run "recovery after SIGKILL, 1 GiB log, ms" open_ms recovery --log-size 1GiB
run "recovery after SIGKILL, 10 GiB log, ms" open_ms recovery --log-size 10GiB
run "recovery after SIGKILL, 1,000 topics, ms" open_ms recovery --log-size 64MiB --topics 1000
run "clean reopen, 1,000 topics, ms"           clean_open_ms recovery --log-size 64MiB --topics 1000
# 80,000 queues map 80,000 files in the filling process: more than the kernel's default
# vm.max_map_count (65,530), which RocketMQ and Kafka also ask operators to raise.
if [ "$(cat /proc/sys/vm/max_map_count)" -lt 131072 ] && [ "$(id -u)" = 0 ]; then
  sysctl -qw vm.max_map_count=131072
fi
run "recovery after SIGKILL, 10,000 topics, ms" open_ms recovery --log-size 64MiB --topics 10000
run "clean reopen, 10,000 topics, ms"           clean_open_ms recovery --log-size 64MiB --topics 10000
