#!/usr/bin/env bash
# Runs the whole pipeline on this machine: a RabbitMQ node on loopback
# (Debian's rabbitmq-server, installed when missing), then warren-producer and
# one warren-consumer with deploy/producer.toml and deploy/consumer.toml. The
# example schedule fires `demo.hello` every 5 seconds; watch the consumer
# execute it in the log. Ctrl-C (or SIGINT/SIGTERM to this script alone, or
# its output pipe closing) stops all of it: the services drain, then the node
# stops; whatever is still running after STOP_GRACE seconds is killed.
#
#   WARREN_BROKER_PORT   AMQP port of the node (default 5672; a free one if taken)
#   CONSUMERS            how many consumer processes (default 1)
#   PRODUCER_PORT        producer HTTP port (default 8080)
#   CONSUMER_PORT        first consumer's HTTP port (default 9090; the next ones follow)
#   WARREN_PROFILE       cargo profile of the binaries: release (default) or debug
#   RUN_DIR              the node's state (default ${TMPDIR:-/tmp}/warren-run-broker)
#   STOP_GRACE           seconds the services get to drain (default 25)
set -euo pipefail
cd "$(dirname "$0")/.."

port=${WARREN_BROKER_PORT:-5672}
producer_port=${PRODUCER_PORT:-8080}
consumer_port=${CONSUMER_PORT:-9090}
profile=${WARREN_PROFILE:-release}
node_dir=${RUN_DIR:-${TMPDIR:-/tmp}/warren-run-broker}
grace=${STOP_GRACE:-25}
if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
  echo "run.sh: port $port is taken; using a free port" >&2
  port=0
fi

if ! command -v cargo >/dev/null; then
  echo "run.sh: cargo is required (https://rustup.rs)" >&2
  exit 1
fi
case "$profile" in
  release) cargo build --release --bin warren-producer --bin warren-consumer ;;
  debug) cargo build --bin warren-producer --bin warren-consumer ;;
  *) echo "run.sh: WARREN_PROFILE must be release or debug, not '$profile'" >&2; exit 2 ;;
esac
bin=target/$profile

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

WARREN_HTTP_ADDR=127.0.0.1:$producer_port "$bin/warren-producer" --config deploy/producer.toml &
pids+=($!)
for i in $(seq 1 "${CONSUMERS:-1}"); do
  WARREN_HTTP_ADDR=127.0.0.1:$((consumer_port + i - 1)) "$bin/warren-consumer" --config deploy/consumer.toml &
  pids+=($!)
done
echo "run.sh: producer API and metrics on http://127.0.0.1:$producer_port (/metrics, /v1/schedules);"
echo "run.sh: consumer metrics on http://127.0.0.1:$consumer_port/metrics. Ctrl-C to stop."
# Any service ending (a crash, or SIGINT from the terminal reaching it first)
# ends the run: the others are stopped too rather than left half-running.
set +e
wait -n "${pids[@]}"
status=$?
set -e
cleanup
exit "$status"
