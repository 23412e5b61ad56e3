#!/usr/bin/env bash
# Runs the whole pipeline on this machine: a RabbitMQ node on loopback
# (Debian's rabbitmq-server, installed when missing), then warren-producer and
# one warren-consumer with deploy/producer.toml and deploy/consumer.toml. The
# example schedule fires `demo.hello` every 5 seconds; watch the consumer
# execute it in the log. Ctrl-C (or SIGINT/SIGTERM to this script alone, or
# its output pipe closing) stops all of it: the services drain, then the node
# stops; whatever is still running after STOP_GRACE seconds is killed.
#
# Each service must be running and answer /healthz within START_TIMEOUT
# seconds, or the script stops everything and exits 1 saying which did not.
# Unless you set an API token yourself (WARREN_API__ADMIN_TOKEN,
# WARREN_API__PUBLISH_TOKEN, WARREN_API__READ_TOKEN or WARREN_API__TOKENS_FILE),
# the producer gets a random admin token for this run only, and the script
# prints a console link that signs you in with it (console.link_login: a
# local demo's setting, never for a shared server; docs/console.md).
#
#   WARREN_BROKER_PORT   AMQP port of the node (default 5672; a free one if taken)
#   CONSUMERS            how many consumer processes (default 1)
#   PRODUCER_PORT        producer HTTP port (default 8080)
#   CONSUMER_PORT        first consumer's HTTP port (default 9090; the next ones follow)
#   WARREN_PROFILE       cargo profile of the binaries: release (default) or debug
#   RUN_DIR              the node's state (default ${TMPDIR:-/tmp}/warren-run-broker)
#   STOP_GRACE           seconds the services get to drain (default 25)
#   START_TIMEOUT        seconds each service gets to answer /healthz (default 60)
#
# The binaries are taken from cargo's target directory wherever it is
# (CARGO_TARGET_DIR, build.target-dir, or ./target), as `cargo metadata` says.
set -euo pipefail
cd "$(dirname "$0")/.."

port=${WARREN_BROKER_PORT:-5672}
producer_port=${PRODUCER_PORT:-8080}
consumer_port=${CONSUMER_PORT:-9090}
profile=${WARREN_PROFILE:-release}
node_dir=${RUN_DIR:-${TMPDIR:-/tmp}/warren-run-broker}
grace=${STOP_GRACE:-25}
start_timeout=${START_TIMEOUT:-60}
consumers=${CONSUMERS:-1}
taken() { (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }
if taken "$port"; then
  echo "run.sh: port $port is taken; using a free port" >&2
  port=0
fi
# A service whose port is taken would exit at once, and whatever holds the
# port might even answer its /healthz: refuse before starting anything.
for p in "$producer_port" $(seq "$consumer_port" $((consumer_port + consumers - 1))); do
  if taken "$p"; then
    echo "run.sh: port $p is taken; choose other ports with PRODUCER_PORT and CONSUMER_PORT" >&2
    exit 1
  fi
done

if ! command -v cargo >/dev/null; then
  echo "run.sh: cargo is required (https://rustup.rs)" >&2
  exit 1
fi
case "$profile" in
  release) cargo build --release --bin warren-producer --bin warren-consumer ;;
  debug) cargo build --bin warren-producer --bin warren-consumer ;;
  *) echo "run.sh: WARREN_PROFILE must be release or debug, not '$profile'" >&2; exit 2 ;;
esac
# Where cargo put them: CARGO_TARGET_DIR and cargo's config decide, not us.
target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin=${target_dir:-${CARGO_TARGET_DIR:-target}}/$profile
for b in warren-producer warren-consumer; do
  if [ ! -x "$bin/$b" ]; then
    echo "run.sh: $bin/$b not found after the build (cargo's target directory: ${target_dir:-unknown})" >&2
    exit 1
  fi
done

# The demo's credentials: a token for this run, unless the user brought one.
demo_token=""
producer_env=()
if [ -z "${WARREN_API__ADMIN_TOKEN:-}${WARREN_API__PUBLISH_TOKEN:-}${WARREN_API__READ_TOKEN:-}${WARREN_API__TOKENS_FILE:-}" ]; then
  demo_token=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
  producer_env=(WARREN_API__ADMIN_TOKEN="$demo_token" WARREN_CONSOLE__LINK_LOGIN=true)
fi

pids=()
stopping=""
cleanup() {
  [ -n "$stopping" ] && return
  stopping=1
  trap - EXIT
  # With `| tee` and Ctrl-C the reader is gone: a write to it must not kill
  # this script half-way through its cleanup (SIGPIPE), nor its children.
  trap '' PIPE INT TERM HUP
  say() { echo "run.sh: $*" >&2 2>/dev/null || true; }
  say "stopping (services drain for up to ${grace}s)"
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # Wait for the services alone (not any other child), with a bound.
  local deadline=$((SECONDS + grace))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      say "pid $pid did not stop in ${grace}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  bash deploy/broker.sh stop --dir "$node_dir" > /dev/null 2>&1 || true
  say "stopped"
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
trap 'cleanup; exit 129' HUP

node_name=warren-run
[ -n "${RUN_DIR:-}" ] && node_name=warren-run-$(printf '%s' "$RUN_DIR" | cksum | cut -d' ' -f1)
WARREN_AMQP_URL=$(bash deploy/broker.sh start --dir "$node_dir" --port "$port" \
  --name "$node_name" --watch $$ | tail -n 1)
export WARREN_AMQP_URL
echo "run.sh: broker at ${WARREN_AMQP_URL/guest:guest@/guest:***@}"

names=()
ports=()
env ${producer_env[@]+"${producer_env[@]}"} WARREN_HTTP_ADDR=127.0.0.1:$producer_port \
  "$bin/warren-producer" --config deploy/producer.toml &
pids+=($!)
names+=(warren-producer)
ports+=("$producer_port")
for i in $(seq 1 "$consumers"); do
  WARREN_HTTP_ADDR=127.0.0.1:$((consumer_port + i - 1)) "$bin/warren-consumer" --config deploy/consumer.toml &
  pids+=($!)
  names+=("warren-consumer $i")
  ports+=($((consumer_port + i - 1)))
done

# Up means: the process runs and its /healthz answers 200. Only then are
# the URLs worth printing.
healthy() {
  timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/"$1" || exit 1
    printf "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" >&3
    read -r status <&3 && [[ $status == HTTP/1.?" 200"* ]]' _ "$1" 2>/dev/null
}
deadline=$((SECONDS + start_timeout))
for idx in "${!pids[@]}"; do
  until healthy "${ports[$idx]}"; do
    if ! kill -0 "${pids[$idx]}" 2>/dev/null; then
      st=0
      wait "${pids[$idx]}" || st=$?
      echo "run.sh: ${names[$idx]} exited with status $st before it answered http://127.0.0.1:${ports[$idx]}/healthz (its log is above); stopping" >&2
      exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "run.sh: ${names[$idx]} did not answer http://127.0.0.1:${ports[$idx]}/healthz within ${start_timeout}s; stopping" >&2
      exit 1
    fi
    sleep 0.2
  done
done
echo "run.sh: producer API and metrics on http://127.0.0.1:$producer_port (/metrics, /v1/schedules);"
echo "run.sh: consumer metrics on http://127.0.0.1:$consumer_port/metrics. Ctrl-C to stop."
if [ -n "$demo_token" ]; then
  echo "run.sh: API token for this run (scopes read, publish, admin): $demo_token"
  echo "run.sh: console, signed in: http://127.0.0.1:$producer_port/ui/login?token=$demo_token"
else
  echo "run.sh: console on http://127.0.0.1:$producer_port/ui/ (sign in with your token)"
fi
# Any service ending (a crash, or SIGINT from the terminal reaching it first)
# ends the run: the others are stopped too rather than left half-running.
set +e
wait -n "${pids[@]}"
status=$?
set -e
cleanup
exit "$status"
