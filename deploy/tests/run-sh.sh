#!/usr/bin/env bash
# Tests deploy/run.sh itself: start it, see a task executed, stop it the ways
# people do, and check that every process it started is gone and its ports
# are free within a bound.
#
#   ctrl-c        SIGINT to its whole process group (a terminal's Ctrl-C)
#   pipe-ctrl-c   `run.sh 2>&1 | tee log` and Ctrl-C: the reader dies too
#   script-int    SIGINT to the script alone
#   script-term   SIGTERM to the script alone
#
# Uses debug binaries (WARREN_PROFILE=debug; build them first), free ports and
# a node of its own per scenario. Prints "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/../.."

BOUND=${RUN_SH_STOP_BOUND:-45}   # seconds from the signal to everything gone
work=$(mktemp -d -t warren-run-sh.XXXXXX)
passed=0
failed=0

# New session, SIGINT back to its default: a background command of a script
# (this one, or whatever started it) inherits SIGINT ignored, and bash cannot
# trap a signal ignored on entry, as a terminal's run.sh can.
session=(python3 -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.setsid()
os.execvp(sys.argv[1], sys.argv[1:])')
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
listening() { (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }
session_pids() { ps -e -o pid=,sid= | awk -v s="$1" '$2 == s { print $1 }'; }

# Runs one scenario; echoes why it failed, if it did.
scenario() {
  local name=$1 dir=$work/$1 log=$work/$1.log
  mkdir -p "$dir"
  local pport cport
  pport=$(free_port)
  cport=$(free_port)
  local env=(WARREN_BROKER_PORT=0 PRODUCER_PORT=$pport CONSUMER_PORT=$cport
    WARREN_PROFILE=debug RUN_DIR=$dir/node STOP_GRACE=20)
  # A session of its own: its id names every process the script starts,
  # except the broker (broker.sh gives it its own session; checked by pid).
  if [ "$name" = pipe-ctrl-c ]; then
    env "${env[@]}" "${session[@]}" bash -c 'bash deploy/run.sh 2>&1 | tee "$0" > /dev/null' "$log" < /dev/null &
  else
    env "${env[@]}" "${session[@]}" bash deploy/run.sh > "$log" 2>&1 < /dev/null &
  fi
  local leader=$!
  local sid=$leader
  local deadline=$((SECONDS + 120))
  until grep -q "noop handled task" "$log" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$leader" 2>/dev/null; then
      echo "no task executed within 120 s; log:"; tail -20 "$log"
      kill -KILL -- -"$sid" 2>/dev/null
      return 1
    fi
    sleep 0.5
  done
  local amqp_port broker_pid script_pid
  amqp_port=$(sed -n 's#.*broker at amqp://[^@]*@127.0.0.1:\([0-9]*\)/.*#\1#p' "$log" | head -1)
  broker_pid=$(cat "$dir/node/rabbit.pid")
  # The script's own pid: in the pipe case the session leader is `bash -c`.
  script_pid=$(pgrep -s "$sid" -f 'deploy/run.sh$' | head -1)
  [ -n "$script_pid" ] || { echo "cannot find run.sh in session $sid"; return 1; }
  local started=$SECONDS
  case "$name" in
    ctrl-c | pipe-ctrl-c) kill -INT -- -"$sid" ;;
    script-int) kill -INT "$script_pid" ;;
    script-term) kill -TERM "$script_pid" ;;
  esac
  deadline=$((SECONDS + BOUND))
  while :; do
    local left
    left=$(session_pids "$sid")
    kill -0 "$broker_pid" 2>/dev/null && left="$left broker:$broker_pid"
    for p in "$amqp_port" "$pport" "$cport"; do listening "$p" && left="$left port:$p"; done
    left=$(echo $left)
    [ -z "$left" ] && break
    if [ $SECONDS -ge $deadline ]; then
      echo "still there ${BOUND}s after the signal: $left"
      ps -o pid,sid,args -p "$(session_pids "$sid" | paste -sd, -)" 2>/dev/null
      tail -20 "$log"
      kill -KILL -- -"$sid" 2>/dev/null
      kill -KILL "$broker_pid" 2>/dev/null
      return 1
    fi
    sleep 0.5
  done
  echo "stopped everything in $((SECONDS - started)) s"
}

for s in ctrl-c pipe-ctrl-c script-int script-term; do
  if out=$(scenario "$s" 2>&1); then
    echo "PASS run.sh $s: $out"
    passed=$((passed + 1))
  else
    echo "FAIL run.sh $s: $out"
    failed=$((failed + 1))
  fi
done
rm -rf "$work"
echo "run.sh: $passed passed, $failed failed"
[ "$failed" = 0 ]
