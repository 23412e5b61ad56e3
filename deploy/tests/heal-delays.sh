#!/usr/bin/env bash
# Tests deploy/heal-delays.sh on a node of its own, with quorum delay levels
# in the two states node restarts leave them in: one whose dead-letter worker
# is gone (stopped here) and one whose worker is alive but forwards nothing
# (suspended here; after a restart it waits minutes for confirms it lost).
# Each holds a delayed task where no AMQP client can reach it; the healer
# replaces the workers and both tasks arrive. Then a second look finds
# nothing to do.
#
#   bash deploy/tests/heal-delays.sh      (from the repo root, debug binaries built)
#
# Prints one line per check and "heal-delays: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/../.."

target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin=${target_dir:-${CARGO_TARGET_DIR:-target}}/debug
for b in warren-producer warren-consumer; do
  [ -x "$bin/$b" ] || { echo "heal-delays test: $bin/$b is missing; build it first" >&2; exit 2; }
done

work=$(mktemp -d -t warren-heal-delays.XXXXXX)
passed=0
failed=0
cleanup() { bash deploy/broker.sh stop --dir "$work/node" > /dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
pass() { echo "ok    $1"; passed=$((passed + 1)); }
fail() { echo "FAIL  $1"; failed=$((failed + 1)); }

url=$(bash deploy/broker.sh start --dir "$work/node" --port 0 --name "warren-heal-$$" --watch $$ | tail -n 1)
ctl=(bash deploy/broker.sh ctl --dir "$work/node")
export WARREN_AMQP_URL=$url WARREN_TOPOLOGY__QUEUE_TYPE=quorum WARREN_TOPOLOGY__PREFIX=healtest
gone=healtest.delay.3     # 800 ms: the one level an 800 ms delay waits in
stalled=healtest.delay.4  # 1.6 s: likewise for 1600 ms
work_queue=healtest.default

# messages, ready, unacked of one queue, as RabbitMQ counts them.
counts() {
  "${ctl[@]}" list_queues -q --no-table-headers name messages messages_ready messages_unacknowledged 2>/dev/null \
    | awk -v q="$1" '$1 == q { print $2, $3, $4 }'
}
# Waits up to $2 seconds for counts of $1 to equal $3.
wait_counts() {
  local deadline=$((SECONDS + $2)) c
  while :; do
    c=$(counts "$1")
    [ "$c" = "$3" ] && return 0
    [ $SECONDS -ge "$deadline" ] && { echo "$c"; return 1; }
    sleep 1
  done
}

if ! "$bin/warren-consumer" declare > "$work/declare.log" 2>&1; then
  echo "heal-delays test: cannot declare the topology:"; cat "$work/declare.log"; exit 1
fi

# The faults. `sys:suspend` keeps the worker alive and registered but deaf,
# as one waiting for lost confirms is.
fault() { # level, what to do with its worker
  "${ctl[@]}" eval "
    Q = rabbit_misc:r(<<\"/\">>, queue, <<\"$1\">>),
    [$2 || {_, P, _, _} <- supervisor:which_children(rabbit_fifo_dlx_sup),
           (catch element(2, sys:get_state(P))) =:= Q]." 2>&1
}
if [ "$(fault "$gone" 'supervisor:terminate_child(rabbit_fifo_dlx_sup, P)')" = "[ok]" ] \
  && [ "$(fault "$stalled" 'sys:suspend(P)')" = "[ok]" ]; then
  pass "faults: the dead-letter worker of $gone stopped, that of $stalled suspended"
else
  fail "faults: could not stop or suspend the dead-letter workers"
fi

for t in "800ms heal-1" "1600ms heal-2"; do
  set -- $t
  "$bin/warren-producer" publish --delay "$1" --id "$2" heal.test --payload '{}' > "$work/publish.log" 2>&1 \
    || { echo "heal-delays test: publish failed:"; cat "$work/publish.log"; exit 1; }
done

# Well past each level's TTL: each task is held where AMQP cannot see it (not
# ready, not unacked) and has not arrived.
for level in "$gone" "$stalled"; do
  if got=$(wait_counts "$level" 20 "1 0 0"); then
    pass "stuck: $level holds its task unforwarded (messages 1, ready 0, unacked 0)"
  else
    fail "stuck: expected $level at '1 0 0', got '$got'"
  fi
done
if [ "$(counts "$work_queue")" = "0 0 0" ]; then
  pass "stuck: $work_queue is empty"
else
  fail "stuck: $work_queue at '$(counts "$work_queue")'"
fi

out=$(RABBITMQCTL="${ctl[*]}" bash deploy/heal-delays.sh --prefix healtest --once --margin 2 \
  --metrics "$work/heal.prom" 2>&1)
status=$?
if [ $status = 0 ] && echo "$out" | grep -q "$gone held 1 expired message(s) unforwarded .*replaced its dead-letter worker on .* (old: \[\])" \
  && echo "$out" | grep -q "$stalled held 1 expired message(s) unforwarded .*replaced its dead-letter worker on .* (old: \[<"; then
  pass "healer: started a worker for $gone, replaced the one of $stalled"
else
  fail "healer: exit $status, output: $out"
fi

if got=$(wait_counts "$work_queue" 20 "2 2 0"); then
  pass "healed: both tasks reached $work_queue"
else
  fail "healed: $work_queue at '$got', $gone at '$(counts "$gone")', $stalled at '$(counts "$stalled")'"
fi
for level in "$gone" "$stalled"; do
  if grep -q "^warren_delay_healer_restarts_total{vhost=\"/\",queue=\"$level\"} 1$" "$work/heal.prom" 2>/dev/null \
    && grep -q "^warren_delay_healer_released_messages_total{vhost=\"/\",queue=\"$level\"} 1$" "$work/heal.prom"; then
    pass "metrics: one worker replaced, one message released, for $level"
  else
    fail "metrics for $level: $(grep "$level" "$work/heal.prom" 2>/dev/null || echo 'no file')"
  fi
done
if command -v promtool > /dev/null; then
  if lint=$(promtool check metrics < "$work/heal.prom" 2>&1); then
    pass "metrics: promtool check metrics"
  else
    fail "metrics: promtool check metrics: $lint"
  fi
fi

# Nothing held any more: a second look replaces nothing.
wait_counts "$gone" 20 "0 0 0" > /dev/null
wait_counts "$stalled" 20 "0 0 0" > /dev/null
out=$(RABBITMQCTL="${ctl[*]}" bash deploy/heal-delays.sh --prefix healtest --once --margin 1 2>&1)
status=$?
if [ $status = 0 ] && ! echo "$out" | grep -q replaced; then
  pass "healthy: a second look replaces nothing"
else
  fail "healthy: exit $status, output: $out"
fi

echo "heal-delays: $passed passed, $failed failed"
[ "$failed" = 0 ]
