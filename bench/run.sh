#!/usr/bin/env bash
# Regenerate the benchmark table: README.md (between <!-- bench:begin --> and
# <!-- bench:end -->) and its detail in docs/benchmarks.md (between
# <!-- bench-detail:begin --> and <!-- bench-detail:end -->).
#
#   bash bench/run.sh                 # ~40 minutes on a 2-core machine
#   MESSAGES=20000 RUNS=3 bash bench/run.sh --no-write   # quicker, prints only
#   bash bench/run.sh --no-peers      # warren and plain lapin only
#   bash bench/run.sh --shared-cores  # the shared layout only
#
# Builds the release binaries, starts a throwaway RabbitMQ node of its own
# (deploy/broker.sh, random port), runs the publish, drain (both queue
# settings; the same prefetch for every side, and each side's defaults) and
# latency scenarios of warren-bench in two layouts (broker pinned apart from
# the clients, and everything sharing the cores), each interleaving its
# sides run by run so the ratios hold on a machine whose speed drifts, and
# prints the Markdown table (a row per layout and scenario, CPU per task of
# client and broker for every side) with the machine, the broker version
# and the load average. Benchmarks report; nothing here fails on a number.
# The peers (Python Celery, and rusty-celery built from bench/peers/rusty-celery,
# a crate outside the workspace) get their columns when they can be had; one
# that cannot is "not measured", with the reason printed.
set -euo pipefail
cd "$(dirname "$0")/.."

MESSAGES=${MESSAGES:-50000}
RUNS=${RUNS:-5}
write=1
with_peers=1
isolate=1
for arg in "$@"; do
  case $arg in
  --no-write) write=0 ;;
  --no-peers) with_peers=0 ;;
  --shared-cores) isolate=0 ;;
  *)
    echo "bench/run.sh: unknown argument $arg (--no-write, --no-peers, --shared-cores)" >&2
    exit 2
    ;;
  esac
done

work=$(mktemp -d)
broker="$work/broker"
cleanup() {
  bash deploy/broker.sh stop --dir "$broker" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release -q -p warren-bench -p warren-consumer -p warren-producer
bin_dir="${CARGO_TARGET_DIR:-target}/release"
peers=
if ((with_peers)); then
  # Python Celery is a peer when it can be had (never in CI's test path).
  if ! python3 -c 'import celery' 2>/dev/null; then
    python3 -m pip install -q celery 2>/dev/null ||
      python3 -m pip install -q --break-system-packages celery 2>/dev/null ||
      echo "bench/run.sh: could not install Python Celery; its column stays empty"
  fi
  peers=celery
  # Its own target dir, whatever CARGO_TARGET_DIR says: warren-bench looks there.
  if CARGO_TARGET_DIR=bench/peers/rusty-celery/target \
    cargo build --release -q --manifest-path bench/peers/rusty-celery/Cargo.toml; then
    peers=celery,rusty-celery
  else
    echo "bench/run.sh: the rusty-celery peer did not build (above); its column says not measured"
  fi
else
  echo "bench/run.sh: --no-peers: the rusty-celery and Celery columns say not measured / —"
fi
url=$(bash deploy/broker.sh start --dir "$broker" --port 0 --name "warren-bench-$$" | tail -n 1)
broker_pid=$(cat "$broker/rabbit.pid")
# A broker has a host of its own in production. On one machine the clients'
# CPU would otherwise preempt the broker's schedulers and vice versa, and
# every figure would measure that contention: half the CPUs (at least one)
# go to the broker, with as many Erlang schedulers online, the rest to the
# clients (warren-bench and everything it starts, peers included).
ncpu=$(nproc)
place_broker() { # N: the broker on CPUs 0..N-1, with N schedulers online
  taskset -a -p -c "0-$(($1 - 1))" "$broker_pid" >/dev/null &&
    bash deploy/broker.sh ctl --dir "$broker" eval "erlang:system_flag(schedulers_online, $1)." >/dev/null
}
client=()
layout="broker and clients on the same $ncpu cores"
if ((isolate && ncpu >= 2)) && command -v taskset >/dev/null; then
  half=$((ncpu / 2))
  if place_broker "$half"; then
    client=(taskset -c "$half-$((ncpu - 1))")
    cpus() { if (($1 == $2)); then echo "CPU $1"; else echo "CPUs $1–$2"; fi; }
    layout="broker pinned to $(cpus 0 $((half - 1))) with $half Erlang scheduler(s) online, clients on $(cpus "$half" $((ncpu - 1))) (as on hosts of their own)"
  else
    place_broker "$ncpu" 2>/dev/null || true
    echo "bench/run.sh: could not pin the broker (above): broker and clients share the cores"
  fi
elif ((isolate)); then
  echo "bench/run.sh: $ncpu CPU(s) or no taskset: broker and clients share the cores"
fi
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# Both layouts in one invocation, each scenario's rows side by side: pinned
# as above (the broker alone on its core: its CPU per task decides) and
# shared (nothing pinned, as a broker and its workers on one host: the
# clients' CPU per task decides). --shared-cores: the shared one only.
measure() { # LAYOUT-NAME, CLIENT-PREFIX...
  local name=$1
  shift
  local rows="$work/rows-$name.md"
  : >"$rows"
  bench() {
    "$@" "$bin_dir/warren-bench" --url "$url" --table "$rows" --broker-pid "$broker_pid" "${args[@]}" |
      sed -u -E "s/^(publish|drain|latency)/\1 [$name]/" | tee -a "$work/detail.txt"
  }
  args=(--scenario publish --messages "$MESSAGES" --runs "$RUNS" --peers "$peers"
    --sides plain,plain-contract,library,cli,api --peer-messages "${PEER_MESSAGES:-3000}")
  bench "$@"
  args=(--scenario drain --messages "$MESSAGES" --runs "$RUNS" --max-priority 0,10
    --drain-prefetch 64 --peers "$peers" --peer-messages "${PEER_MESSAGES:-3000}")
  bench "$@"
  args=(--scenario latency --seconds 5)
  bench "$@"
}
layouts=()
if ((${#client[@]})); then
  measure pinned "${client[@]}"
  layouts+=("pinned: $layout")
fi
place_broker "$ncpu" 2>/dev/null || true
measure shared
layouts+=("shared: broker ($ncpu Erlang schedulers) and clients unpinned on the same $ncpu cores")

load_after=$(cut -d' ' -f1-3 /proc/loadavg)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
version=$(bash deploy/broker.sh ctl --dir "$broker" version 2>/dev/null | tail -n 1)
rev=$(git rev-parse --short HEAD)
table="$work/table.md"
{
  echo "$ncpu cores ($cpu), RabbitMQ $version;"
  for l in "${layouts[@]}"; do echo "$l;"; done
  echo "$(date -u +%Y-%m-%d), \`$rev\`, load average $load_before before and $load_after after"
  echo "(other work on the machine counts: compare the ratios, measured side by side in one run)."
  echo "Cells: median of $RUNS interleaved runs (min–max); CPU per task from /proc/<pid>/stat over the"
  echo "measured window, client / broker; \`bash bench/run.sh\` regenerates this."
  echo
  echo "| layout | what | plain lapin | warren | warren / plain | target | rusty-celery | Celery | note |"
  echo "|---|---|---|---|---|---|---|---|---|"
  # Row i of each layout, one under the other.
  awk -v shared="$work/rows-shared.md" '
    { print "| pinned " $0; if ((getline l < shared) > 0) print "| shared " l }
    END { while ((getline l < shared) > 0) print "| shared " l }' \
    "$( [[ -f $work/rows-pinned.md ]] && echo "$work/rows-pinned.md" || echo /dev/null)"
} >"$table"
cat "$table"

# Replace the lines between two marker lines of a file with another file.
splice() { # FILE BEGIN END CONTENT
  awk -v b="$2" -v e="$3" -v c="$4" '
    $0 == b { print; while ((getline l < c) > 0) print l; skip = 1; next }
    $0 == e { skip = 0 }
    !skip { print }' "$1" >"$1.new"
  mv "$1.new" "$1"
}
if ((write)); then
  splice README.md '<!-- bench:begin -->' '<!-- bench:end -->' "$table"
  {
    echo '```text'
    grep -E '^(publish|drain|latency)' "$work/detail.txt" | grep -v ' run [0-9]' || true
    echo '```'
  } >"$work/detail.md"
  splice docs/benchmarks.md '<!-- bench-detail:begin -->' '<!-- bench-detail:end -->' "$work/detail.md"
  echo "bench/run.sh: README.md and docs/benchmarks.md updated"
fi
