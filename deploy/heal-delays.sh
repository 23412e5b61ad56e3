#!/usr/bin/env bash
# Heals warren delay levels whose dead-lettering RabbitMQ stalled (quorum
# queues only; docs/cluster.md#a-stuck-delay-level explains the fault).
#
# A quorum delay level moves an expired message on through a dead-letter
# worker process that RabbitMQ runs beside the queue's leader: it publishes
# the message to the next level with confirms and only then lets the queue
# forget it. After node kills and restarts that worker can stall (it keeps
# waiting, up to dead_letter_worker_publisher_confirm_timeout, 3 min on 3.10,
# for confirms from a queue leader that is gone) or be missing. Meanwhile the
# level expires messages into the queue's internal dead-letter store, where no
# AMQP client can reach them: they are neither ready nor unacked, so
# `basic.get` and consumers never see them. Only the broker can move them, so
# this runs where rabbitmqctl reaches the cluster (on a broker host, or as a
# sidecar with the Erlang cookie), not in warren's own processes.
#
# Every INTERVAL seconds it lists the levels. A level whose held messages
# (messages - ready - unacked) stay above zero and do not go down for MARGIN
# seconds gets a new dead-letter worker on its leader node (the old one, if
# any, is stopped first). The new worker forwards everything the level held,
# at least once: a message the old worker had forwarded without a confirm
# comes out twice, with the same task id, as it would after RabbitMQ's own
# confirm timeout.
#
#   deploy/heal-delays.sh [--prefix warren] [--vhost /] [--interval 10]
#                         [--margin 30] [--metrics FILE] [--once]
#
#   --prefix     topology.prefix of the deployment (its levels: PREFIX.delay.N)
#   --vhost      the virtual host
#   --interval   seconds between two looks
#   --margin     seconds a level must hold messages, never fewer, before it
#                counts as stuck (a working level forwards them within
#                milliseconds; RabbitMQ's queue stats lag by ~5 s)
#   --metrics    write Prometheus text to FILE after each look (for
#                node_exporter's textfile collector): workers replaced and
#                the messages the levels held then, per level
#   --once       look (twice, MARGIN apart), heal, exit; exit 1 if a stuck
#                level could not be healed
#
#   RABBITMQCTL  the rabbitmqctl command (default `rabbitmqctl`), e.g.
#                `bash deploy/broker.sh ctl --dir /tmp/warren-broker` or
#                `docker compose exec -T rabbitmq rabbitmqctl`
#
# Uses `rabbitmqctl eval` for the one thing no other command does (replace a
# queue's dead-letter worker: RabbitMQ 3.10 to 4.x keep it under
# rabbit_fifo_dlx_sup); it never deletes, purges or moves a message itself.
set -uo pipefail

prefix=warren
vhost=/
interval=10
margin=30
metrics=""
once=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --vhost) vhost=$2; shift 2 ;;
    --interval) interval=$2; shift 2 ;;
    --margin) margin=$2; shift 2 ;;
    --metrics) metrics=$2; shift 2 ;;
    --once) once=1; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "heal-delays.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for v in interval margin; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "heal-delays.sh: --$v must be whole seconds, not '${!v}'" >&2; exit 2; }
done
read -r -a ctl <<< "${RABBITMQCTL:-rabbitmqctl}"

log() { echo "$(date -u +%FT%TZ) heal-delays.sh: $*"; }

# Erlang binaries are written <<"...">>: the names must not break out of one.
case "$prefix$vhost" in
  *'"'* | *'\'*) echo "heal-delays.sh: quotes and backslashes are not allowed in --prefix or --vhost" >&2; exit 2 ;;
esac

declare -A since=()      # level -> first look of its current stuck streak
declare -A held_now=()   # level -> messages held at the last look
declare -A held_last=()  # level -> messages held at the look before
declare -A restarts=()   # level -> workers replaced (or started)
declare -A released=()   # level -> messages held when its worker was replaced

# One look: held_now[level] for every quorum delay level of the prefix.
look() {
  local out name type messages ready unacked level
  held_last=()
  for level in "${!held_now[@]}"; do held_last[$level]=${held_now[$level]}; done
  held_now=()
  if ! out=$("${ctl[@]}" list_queues -p "$vhost" -q --no-table-headers \
    name type messages messages_ready messages_unacknowledged 2>&1); then
    log "cannot list queues: $(echo "$out" | tail -1)"
    return 1
  fi
  while IFS=$'\t' read -r name type messages ready unacked; do
    [[ $name =~ ^${prefix//./\\.}\.delay\.[0-9]+$ ]] || continue
    # Classic queues dead-letter in the queue process itself: no worker.
    [ "$type" = quorum ] || continue
    [[ $messages$ready$unacked =~ ^[0-9]+$ ]] || continue
    held_now[$name]=$((messages - ready - unacked))
    # Counters start at 0, so the first restart is an increase to see.
    : "${restarts[$name]:=0}" "${released[$name]:=0}"
  done <<< "$out"
}

# Replace the dead-letter worker of `level` on its leader node: stop the
# ones there (if any), start one. Prints `replaced <node> <old pids>` or the
# failure.
replace_worker() {
  local level=$1
  "${ctl[@]}" eval "
    Q = rabbit_misc:r(<<\"$vhost\">>, queue, <<\"$level\">>),
    case rabbit_amqqueue:lookup(Q) of
      {ok, Rec} ->
        {_, Leader} = amqqueue:get_pid(Rec),
        R = rpc:call(Leader, erlang, apply, [fun () ->
              Old = [P || {_, P, _, _} <- supervisor:which_children(rabbit_fifo_dlx_sup),
                          is_pid(P),
                          (catch element(2, sys:get_state(P, 5000))) =:= Q],
              [supervisor:terminate_child(rabbit_fifo_dlx_sup, P) || P <- Old],
              {Old, supervisor:start_child(rabbit_fifo_dlx_sup, [Q])}
            end, []], 30000),
        case R of
          {Old, {ok, Pid}} when is_pid(Pid) -> io:format(\"replaced ~s ~p~n\", [Leader, Old]);
          Other -> io:format(\"failed ~p~n\", [Other])
        end;
      Err -> io:format(\"failed ~p~n\", [Err])
    end." 2>&1 | grep -E '^(replaced|failed)' | head -1
}

write_metrics() {
  [ -n "$metrics" ] || return 0
  local tmp="$metrics.tmp.$$" level v
  local lbl
  {
    echo "# HELP warren_delay_healer_restarts_total Dead-letter workers heal-delays.sh replaced (or started) for a stuck delay level."
    echo "# TYPE warren_delay_healer_restarts_total counter"
    for level in "${!restarts[@]}"; do
      lbl="vhost=\"$vhost\",queue=\"$level\""
      echo "warren_delay_healer_restarts_total{$lbl} ${restarts[$level]}"
    done
    echo "# HELP warren_delay_healer_released_messages_total Messages a delay level held, unforwarded, when heal-delays.sh replaced its worker."
    echo "# TYPE warren_delay_healer_released_messages_total counter"
    for level in "${!released[@]}"; do
      lbl="vhost=\"$vhost\",queue=\"$level\""
      echo "warren_delay_healer_released_messages_total{$lbl} ${released[$level]}"
    done
    echo "# HELP warren_delay_healer_held_messages Expired messages a delay level holds unforwarded, at the last look."
    echo "# TYPE warren_delay_healer_held_messages gauge"
    for level in "${!held_now[@]}"; do
      lbl="vhost=\"$vhost\",queue=\"$level\""
      echo "warren_delay_healer_held_messages{$lbl} ${held_now[$level]}"
    done
    echo "# HELP warren_delay_healer_last_look_timestamp_seconds When heal-delays.sh last listed the levels."
    echo "# TYPE warren_delay_healer_last_look_timestamp_seconds gauge"
    echo "warren_delay_healer_last_look_timestamp_seconds $(date +%s)"
  } > "$tmp" && mv "$tmp" "$metrics"
}

# Heal every level whose held messages stayed above zero, never fewer, for
# `margin` seconds. Returns 1 if one could not be healed.
heal() {
  local now=$1 level held res status=0
  for level in "${!since[@]}"; do
    [ "${held_now[$level]:-0}" -gt 0 ] || unset "since[$level]"
  done
  for level in "${!held_now[@]}"; do
    held=${held_now[$level]}
    [ "$held" -gt 0 ] || continue
    # Fewer than at the last look: it moves, so the streak starts again.
    if [ -n "${since[$level]:-}" ] && [ "$held" -lt "${held_last[$level]:-0}" ]; then
      since[$level]=$now
      continue
    fi
    [ -n "${since[$level]:-}" ] || { since[$level]=$now; continue; }
    [ $((now - since[$level])) -ge "$margin" ] || continue
    res=$(replace_worker "$level")
    case "$res" in
      replaced*)
        restarts[$level]=$((${restarts[$level]:-0} + 1))
        released[$level]=$((${released[$level]:-0} + held))
        local node old
        read -r _ node old <<< "$res"
        log "$level held $held expired message(s) unforwarded for $((now - since[$level]))s: replaced its dead-letter worker on $node (old: $old)"
        unset "since[$level]"
        ;;
      *)
        log "$level holds $held expired message(s) unforwarded; replacing its dead-letter worker failed: ${res:-no answer from rabbitmqctl eval}"
        status=1
        ;;
    esac
  done
  return $status
}

if [ -n "$once" ]; then
  look || exit 1
  if [ "${#held_now[@]}" -gt 0 ]; then
    heal 0 >/dev/null || true
    sleep "$margin"
    look || exit 1
  fi
  heal "$margin"
  status=$?
  write_metrics
  exit $status
fi

log "watching quorum delay levels ${prefix}.delay.* in vhost $vhost every ${interval}s (stuck after ${margin}s)"
trap 'exit 0' INT TERM
while :; do
  if look; then
    heal "$SECONDS" || true
    write_metrics
  fi
  sleep "$interval" &
  wait $!
done
