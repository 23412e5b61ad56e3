#!/usr/bin/env bash
# Heals warren delay levels whose dead-lettering RabbitMQ stopped (quorum
# queues only; docs/cluster.md#a-stuck-delay-level explains the fault).
#
# A quorum delay level moves an expired message on through a dead-letter
# worker process that RabbitMQ runs beside the queue's leader. When that
# worker is gone (seen after rolling restarts: it fails to register with a
# leader that moves, and is not started again until the leader changes), the
# level keeps expiring messages into the queue's internal dead-letter store,
# where no AMQP client can reach them: they are neither ready nor unacked, so
# `basic.get` and consumers never see them. Only the broker can move them, so
# this runs where rabbitmqctl reaches the cluster (on a broker host, or as a
# sidecar with the Erlang cookie), not in warren's own processes.
#
# Every INTERVAL seconds it lists the levels; a level holding dead-lettered
# messages (messages - ready - unacked > 0) for MARGIN seconds in a row whose
# leader node runs no dead-letter worker for it gets one started there. The
# worker then forwards what the level held (at least once: a message the old
# worker had forwarded but not settled comes out twice, with the same task
# id). A level whose worker is alive is only reported.
#
#   deploy/heal-delays.sh [--prefix warren] [--vhost /] [--interval 10]
#                         [--margin 30] [--metrics FILE] [--once]
#
#   --prefix     topology.prefix of the deployment (its levels: PREFIX.delay.N)
#   --vhost      the virtual host
#   --interval   seconds between two looks
#   --margin     seconds a level must hold dead-lettered messages before it
#                counts as stuck (a working level forwards them within
#                milliseconds; RabbitMQ's queue stats lag by ~5 s)
#   --metrics    write Prometheus text to FILE after each look (for
#                node_exporter's textfile collector): restarts and the
#                messages the restarted workers had waiting, per level
#   --once       look (twice, MARGIN apart), heal, exit; exit 1 if a level
#                stayed stuck with a live worker or could not be healed
#
#   RABBITMQCTL  the rabbitmqctl command (default `rabbitmqctl`), e.g.
#                `bash deploy/broker.sh ctl --dir /tmp/warren-broker` or
#                `docker compose exec -T rabbitmq rabbitmqctl`
#
# Uses `rabbitmqctl eval` for the one thing no other command does (start a
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

declare -A since=()      # level -> first look at which it held dead letters
declare -A held_now=()   # level -> dead letters held at the last look
declare -A restarts=()   # level -> workers started
declare -A released=()   # level -> messages held when its worker was started
declare -A reported=()   # level -> already reported as stuck with a live worker

# One look: held_now[level] for every quorum delay level of the prefix.
look() {
  local out name type messages ready unacked
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

# Start a dead-letter worker for `level` on its leader node unless one runs
# there. Prints started, alive:<pids>, or the failure.
ensure_worker() {
  local level=$1
  "${ctl[@]}" eval "
    Q = rabbit_misc:r(<<\"$vhost\">>, queue, <<\"$level\">>),
    case rabbit_amqqueue:lookup(Q) of
      {ok, Rec} ->
        {_, Leader} = amqqueue:get_pid(Rec),
        R = rpc:call(Leader, erlang, apply, [fun () ->
              Live = [P || {_, P, _, _} <- supervisor:which_children(rabbit_fifo_dlx_sup),
                           is_pid(P),
                           (catch element(2, sys:get_state(P, 5000))) =:= Q],
              case Live of
                [] -> supervisor:start_child(rabbit_fifo_dlx_sup, [Q]);
                _ -> {alive, Live}
              end
            end, []], 15000),
        case R of
          {ok, Pid} when is_pid(Pid) -> io:format(\"started ~s~n\", [Leader]);
          {alive, Ps} -> io:format(\"alive ~p~n\", [Ps]);
          Other -> io:format(\"failed ~p~n\", [Other])
        end;
      Err -> io:format(\"failed ~p~n\", [Err])
    end." 2>&1 | grep -E '^(started|alive|failed)' | head -1
}

write_metrics() {
  [ -n "$metrics" ] || return 0
  local tmp="$metrics.tmp.$$" level v
  local lbl
  {
    echo "# HELP warren_delay_healer_restarts_total Dead-letter workers heal-delays.sh started for a stuck delay level."
    echo "# TYPE warren_delay_healer_restarts_total counter"
    for level in "${!restarts[@]}"; do
      lbl="vhost=\"$vhost\",queue=\"$level\""
      echo "warren_delay_healer_restarts_total{$lbl} ${restarts[$level]}"
    done
    echo "# HELP warren_delay_healer_released_messages_total Messages a delay level held, unforwarded, when heal-delays.sh started its worker."
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

# Heal every level that has held dead letters since at least `margin`
# seconds ago. Returns 1 if one could not be healed.
heal() {
  local now=$1 level held res status=0
  for level in "${!since[@]}"; do
    [ -n "${held_now[$level]:-}" ] && [ "${held_now[$level]}" -gt 0 ] || unset "since[$level]" "reported[$level]"
  done
  for level in "${!held_now[@]}"; do
    held=${held_now[$level]}
    [ "$held" -gt 0 ] || continue
    [ -n "${since[$level]:-}" ] || { since[$level]=$now; continue; }
    [ $((now - since[$level])) -ge "$margin" ] || continue
    res=$(ensure_worker "$level")
    case "$res" in
      started*)
        restarts[$level]=$((${restarts[$level]:-0} + 1))
        released[$level]=$((${released[$level]:-0} + held))
        log "$level held $held expired message(s) for $((now - since[$level]))s with no dead-letter worker: started one on ${res#started }"
        unset "since[$level]" "reported[$level]"
        ;;
      alive*)
        if [ -z "${reported[$level]:-}" ]; then
          log "$level holds $held expired message(s) for $((now - since[$level]))s, but its dead-letter worker is alive (${res#alive }): not touched; is its dead-letter target routable? (RabbitMQ's log says)"
          reported[$level]=1
        fi
        status=1
        ;;
      *)
        log "$level holds $held expired message(s) with no working dead-letter worker; starting one failed: ${res:-no answer from rabbitmqctl eval}"
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
