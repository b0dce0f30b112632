#!/usr/bin/env bash
# Produce and consume through each client into one broker (flush = "async"), next to NATS
# JetStream (file storage) publishing the same 1 KiB messages with acks, in the same run.
# Each figure is the median of several runs; next to each rate, the CPU time the server
# (the broker, or nats-server) spent per message, which the machine's noise moves less.
#
# Every produce run starts its server on an empty data directory, and the rows take turns
# within each round. Writing into a file's fresh pages costs this machine several times what
# rewriting freed ones does (see the `page-cache write` line), so a server that has already
# written gigabytes runs slower than a fresh one; NATS's run deletes and recreates its stream
# each time, so ferrumq's does the same with its whole data directory.
#
# Usage: scripts/bench-clients.sh [runs]   (default 3). Needs `nats-server` on the PATH
# (Debian: apt install nats-server) for the NATS rows. The servers keep their data in
# ./target/bench-clients (removed at the end); the broker listens on 127.0.0.1:18183,
# nats-server on 127.0.0.1:18222.
set -euo pipefail
runs=${1:-3}
cd "$(dirname "$0")/.."
cargo build --release -p ferrumq-broker -p ferrumq-benches
bench=target/release/ferrumq-bench
data=target/bench-clients
rm -rf "$data" && mkdir -p "$data"
printf 'flush = "async"\n' > "$data/async.toml"
server_pid=
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
  rm -rf "$data/broker" "$data/nats"
}
# Stop the server and drop its data (several GB) on the way out.
trap 'stop_server; rm -rf "$data"' EXIT
start_broker() {
  stop_server
  mkdir -p "$data/broker"
  target/release/ferrumq-broker --config "$data/async.toml" --data-dir "$data/broker" \
    --grpc-listen 127.0.0.1:18183 --http-listen 127.0.0.1:18182 >/dev/null 2>&1 &
  server_pid=$!
  for _ in $(seq 50); do
    curl -sf 127.0.0.1:18182/readyz >/dev/null 2>&1 && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.2
  done
  echo "the broker did not start (is 127.0.0.1:18183 taken?)" >&2
  exit 1
}
start_nats() {
  stop_server
  mkdir -p "$data/nats"
  nats-server -js -sd "$data/nats" -a 127.0.0.1 -p 18222 >/dev/null 2>&1 &
  server_pid=$!
  sleep 1
}

median() { sort -n | awk '{a[NR]=$1} END {printf "%.0f\n", a[int((NR+1)/2)]}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
# CPU time (user + system, in clock ticks) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A rates mbs cpus
measure() { # row args...   One run against the running server; files rate, MB/s, CPU/msg.
  local row=$1; shift
  local json before
  before=$(cpu_ticks "$server_pid")
  json=$("$bench" "$@" --format json 2>/dev/null | grep '^{')
  rates[$row]+="$(field messages_per_sec <<<"$json") "
  mbs[$row]+="$(field mb_per_sec <<<"$json") "
  cpus[$row]+="$(python3 -c "print(($(cpu_ticks "$server_pid") - $before) * 1e9 / $(getconf CLK_TCK) / $(field messages <<<"$json"))") "
}
report() { # row label
  printf '%-62s %8s msg/s %5s MB/s %6s server CPU ns/msg\n' "$2" \
    "$(tr ' ' '\n' <<<"${rates[$1]}" | grep . | median)" \
    "$(tr ' ' '\n' <<<"${mbs[$1]}" | grep . | median)" \
    "$(tr ' ' '\n' <<<"${cpus[$1]}" | grep . | median)"
}
ep=(--endpoint 127.0.0.1:18183)

# The machine's own cost of writing new pages through the page cache, as a reference: one
# process writing 2 GiB in 1 MiB blocks, without fsync.
page_cache_write() {
  local t0 t1
  t0=$(date +%s.%N)
  dd if=/dev/zero of="$data/dd" bs=1M count=2048 status=none
  t1=$(date +%s.%N)
  rm -f "$data/dd"
  python3 -c "print(round(2048 * 1.048576 / ($t1 - $t0)))"
}
pcw=()

for _ in $(seq "$runs"); do
  pcw+=("$(page_cache_write)")
  if command -v nats-server >/dev/null; then
    start_nats
    measure nats nats --server 127.0.0.1:18222 --count 800000 --concurrency 64
  fi
  start_broker
  measure send produce "${ep[@]}" --client native --count 200000 --concurrency 64 --requests 4
  start_broker
  measure batch produce "${ep[@]}" --client native --count 800000 --concurrency 8 --batch 128
  start_broker
  measure raw produce "${ep[@]}" --count 800000 --concurrency 8 --batch 128
  start_broker
  measure official produce "${ep[@]}" --topic official --client official --count 50000 --concurrency 64
done
echo "== produce 1 KiB, acked, each run into an empty server (median of $runs)"
echo "page-cache write (dd, 1 MiB blocks, no fsync): $(printf '%s\n' "${pcw[@]}" | median) MB/s"
if command -v nats-server >/dev/null; then
  report nats "NATS JetStream, file storage, 64 publishes in flight"
fi
report send "ferrumq-client send(), 64 concurrent, 4 shared requests"
report batch "ferrumq-client send_batch(128), 8 concurrent"
report raw "raw v2 requests of 128, 8 in flight"
report official "official rocketmq 5.0.0 send(), 64 concurrent"

# Consuming reads a backlog written first: enough for every run of the largest row.
start_broker
"$bench" produce "${ep[@]}" --count $((800000 * runs)) --concurrency 8 --batch 128 >/dev/null 2>&1
for _ in $(seq "$runs"); do
  measure c32 consume "${ep[@]}" --client native --group native --count 400000 --concurrency 8 --batch 32
  measure c512 consume "${ep[@]}" --client native --group native512 --count 800000 --concurrency 8 --batch 512
  measure craw consume "${ep[@]}" --group raw --count 400000 --concurrency 8 --batch 32
  measure pull consume "${ep[@]}" --client native --pull --group broadcast --count 800000 --batch 1024
  measure rawpull consume "${ep[@]}" --pull --group pull --count 800000 --batch 1024
done
echo "== consume the backlog: receive B, ack them in one request, 8 concurrent (median of $runs)"
report c32 "ferrumq-client SimpleConsumer receive 32 + ack_all"
report c512 "ferrumq-client SimpleConsumer receive 512 + ack_all"
report craw "raw v2 receive 32 + ack"
echo "== read the log by offset: PullMessage of 1024 per queue, no leases or acks (median of $runs)"
report pull "ferrumq-client BroadcastConsumer, pull_batch(1024)"
report rawpull "raw v2 pull 1024, one pull in flight per queue"
