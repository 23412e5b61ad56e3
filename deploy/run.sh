#!/usr/bin/env bash
# Runs the whole pipeline on this machine: a RabbitMQ node on loopback
# (Debian's rabbitmq-server, installed when missing), then warren-producer and
# one warren-consumer with deploy/producer.toml and deploy/consumer.toml. The
# example schedule fires `demo.hello` every 5 seconds; watch the consumer
# execute it in the log. Ctrl-C stops all three.
#
#   WARREN_BROKER_PORT   AMQP port of the node (default 5672; a free one if taken)
#   CONSUMERS            how many consumer processes (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."

port=${WARREN_BROKER_PORT:-5672}
if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
  echo "run.sh: port $port is taken; using a free port" >&2
  port=0
fi

if ! command -v cargo >/dev/null; then
  echo "run.sh: cargo is required (https://rustup.rs)" >&2
  exit 1
fi
cargo build --release --bin warren-producer --bin warren-consumer

node_dir=${TMPDIR:-/tmp}/warren-run-broker
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  bash deploy/broker.sh stop --dir "$node_dir" || true
}
trap cleanup EXIT INT TERM

WARREN_AMQP_URL=$(bash deploy/broker.sh start --dir "$node_dir" --port "$port" --name warren-run --watch $$ | tail -n 1)
export WARREN_AMQP_URL
echo "run.sh: broker at ${WARREN_AMQP_URL/guest:guest@/guest:***@}"

WARREN_HTTP_ADDR=127.0.0.1:8080 target/release/warren-producer --config deploy/producer.toml &
pids+=($!)
for i in $(seq 1 "${CONSUMERS:-1}"); do
  WARREN_HTTP_ADDR=127.0.0.1:$((9090 + i - 1)) target/release/warren-consumer --config deploy/consumer.toml &
  pids+=($!)
done
echo "run.sh: producer API and metrics on http://127.0.0.1:8080 (/metrics, /v1/schedules);"
echo "run.sh: consumer metrics on http://127.0.0.1:9090/metrics. Ctrl-C to stop."
wait -n "${pids[@]}"
