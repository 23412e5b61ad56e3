#!/usr/bin/env bash
# Tests deploy/run.sh itself: start it, see a task executed, stop it the ways
# people do, and check that every process it started is gone and its ports
# are free within a bound.
#
#   ctrl-c        SIGINT to its whole process group (a terminal's Ctrl-C)
#   pipe-ctrl-c   `run.sh 2>&1 | tee log` and Ctrl-C: the reader dies too
#   script-int    SIGINT to the script alone
#   script-term   SIGTERM to the script alone
#   target-dir    CARGO_TARGET_DIR elsewhere than ./target: the binaries are
#                 taken from there (then SIGTERM as above)
#
# and, on the way:
#   console-link  the sign-in link run.sh prints signs in (ctrl-c's run)
#   quiet-start   no ERROR or WARN line in the first 10 s after the broker is
#                 up, on a fresh node (ctrl-c's run; ANSI colors stripped)
#   service-fails a service that cannot start: run.sh says which, exits
#                 non-zero, prints no URL, and leaves nothing running
#
# Uses debug binaries (WARREN_PROFILE=debug; build them first), free ports and
# a node of its own per scenario. Prints "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/../.."

BOUND=${RUN_SH_STOP_BOUND:-45}   # seconds from the signal to everything gone
QUIET=10                         # seconds of start-up that must log no ERROR/WARN
BUILD_WAIT=${RUN_SH_BUILD_WAIT:-900}  # seconds run.sh's cargo build may take
work=$(mktemp -d -t warren-run-sh.XXXXXX)
# Where the binaries really are; target-dir reaches them through a link, so
# nothing is rebuilt.
real_target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
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
  if [ "$name" = target-dir ]; then
    ln -s "$real_target" "$dir/target"
    env+=(CARGO_TARGET_DIR="$dir/target")
  fi
  # A session of its own: its id names every process the script starts,
  # except the broker (broker.sh gives it its own session; checked by pid).
  if [ "$name" = pipe-ctrl-c ]; then
    env "${env[@]}" "${session[@]}" bash -c 'bash deploy/run.sh 2>&1 | tee "$0" > /dev/null' "$log" < /dev/null &
  else
    env "${env[@]}" "${session[@]}" bash deploy/run.sh > "$log" 2>&1 < /dev/null &
  fi
  local leader=$!
  local sid=$leader
  # cargo may wait for its build lock first (other builds on the machine):
  # the 120 s count from the broker being up.
  local deadline=$((SECONDS + BUILD_WAIT)) up=""
  until grep -q "noop handled task" "$log" 2>/dev/null; do
    if [ -z "$up" ] && grep -q "run.sh: broker at" "$log" 2>/dev/null; then
      up=$SECONDS
      deadline=$((up + 120))
    fi
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$leader" 2>/dev/null; then
      echo "no task executed within 120 s of the broker being up; log:"; tail -20 "$log"
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
  if [ "$name" = ctrl-c ]; then
    # The log of the first seconds, for quiet-start; the link, for console-link.
    while [ $SECONDS -lt $((${up:-$SECONDS} + QUIET)) ]; do sleep 0.5; done
    cp "$log" "$work/first-seconds.log"
    local link got
    link=$(sed -n 's#.*console, signed in: \(http://[^ ]*\).*#\1#p' "$log" | head -1)
    if [ -z "$link" ]; then
      echo "FAIL run.sh printed no console link" > "$work/console-link"
    else
      # Followed as a browser would: the session cookie, then the overview.
      got=$(curl -s -L -c "$dir/jar" -b "$dir/jar" -o /dev/null --max-time 10 \
        -w '%{http_code} %{url_effective}' "$link")
      if [ "$got" = "200 http://127.0.0.1:$pport/ui/" ] && grep -q warren_session "$dir/jar"; then
        echo "PASS the printed link signs in and lands on /ui/ without the token" > "$work/console-link"
      else
        echo "FAIL the printed link $link answered: $got" > "$work/console-link"
      fi
    fi
  fi
  if [ "$name" = target-dir ]; then
    local exe
    exe=$(pgrep -s "$sid" -f 'warren-producer --config' | head -1 | xargs -I{} sh -c 'tr "\0" " " < /proc/{}/cmdline')
    case "$exe" in
      "$dir/target/debug/warren-producer "*) ;;
      *) echo "the producer is not the one in CARGO_TARGET_DIR ($dir/target): ${exe:-not running}"
        kill -KILL -- -"$sid" 2>/dev/null; kill -KILL "$broker_pid" 2>/dev/null; return 1 ;;
    esac
  fi
  local started=$SECONDS
  case "$name" in
    ctrl-c | pipe-ctrl-c) kill -INT -- -"$sid" ;;
    script-int) kill -INT "$script_pid" ;;
    script-term | target-dir) kill -TERM "$script_pid" ;;
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

# The sign-in link the ctrl-c run printed, as tried while it ran.
console_link() {
  local result
  result=$(cat "$work/console-link" 2>/dev/null)
  echo "${result#* }"
  [ "${result%% *}" = PASS ]
}

# No ERROR or WARN line in the ctrl-c run's first QUIET seconds.
quiet_start() {
  [ -f "$work/first-seconds.log" ] || { echo "no log of the first seconds"; return 1; }
  local loud
  loud=$(sed 's/\x1b\[[0-9;]*m//g' "$work/first-seconds.log" | grep -E '(^|[^A-Za-z])(ERROR|WARN)([^A-Za-z]|$)')
  if [ -n "$loud" ]; then
    echo "$(echo "$loud" | wc -l) ERROR/WARN line(s) in the first ${QUIET}s:"
    echo "$loud"
    return 1
  fi
  echo "no ERROR or WARN line in the first ${QUIET}s"
}

# A producer that cannot start (a config value it refuses): run.sh must
# stop with a clear error and a non-zero status, print no URL and leave no
# process or node behind.
service_fails() {
  local dir=$work/service-fails log=$work/service-fails.log
  mkdir -p "$dir"
  local pport cport
  pport=$(free_port)
  cport=$(free_port)
  env WARREN_BROKER_PORT=0 PRODUCER_PORT="$pport" CONSUMER_PORT="$cport" WARREN_PROFILE=debug \
    RUN_DIR="$dir/node" STOP_GRACE=20 WARREN_CONSOLE__SESSION_TTL=0s \
    "${session[@]}" bash deploy/run.sh > "$log" 2>&1 < /dev/null &
  local leader=$! status=0
  local deadline=$((SECONDS + BUILD_WAIT)) up=""
  while kill -0 "$leader" 2>/dev/null; do
    if [ -z "$up" ] && grep -q "run.sh: broker at" "$log" 2>/dev/null; then
      up=$SECONDS
      deadline=$((up + 120))
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "run.sh still running 120 s after the broker was up (the producer cannot start):"; tail -20 "$log"
      kill -KILL -- -"$leader" 2>/dev/null
      return 1
    fi
    sleep 0.5
  done
  wait "$leader" || status=$?
  local why=""
  [ "$status" = 0 ] && why="$why exit status 0;"
  grep -q "run.sh: warren-producer exited with status [1-9].* before it answered" "$log" || why="$why no error naming the producer;"
  grep -q "producer API and metrics on\|console, signed in" "$log" && why="$why URLs printed;"
  # What run.sh started may take a moment to go (broker.sh's watcher of
  # run.sh, the node): the same bound as after a signal.
  local left broker_pid
  broker_pid=$(cat "$dir/node/rabbit.pid" 2>/dev/null)
  deadline=$((SECONDS + BOUND))
  while :; do
    left=$(session_pids "$leader")
    [ -n "$broker_pid" ] && kill -0 "$broker_pid" 2>/dev/null && left="$left broker:$broker_pid"
    left=$(echo $left)
    [ -z "$left" ] || [ $SECONDS -ge $deadline ] && break
    sleep 0.5
  done
  [ -n "$left" ] && why="$why still there ${BOUND}s after run.sh ended: $left;"
  if [ -n "$why" ]; then
    echo "$why"; tail -20 "$log"
    return 1
  fi
  echo "exit $status: $(grep -o 'run.sh: warren-producer exited.*' "$log" | head -1)"
}

check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    echo "PASS run.sh $name: $out"
    passed=$((passed + 1))
  else
    echo "FAIL run.sh $name: $out"
    failed=$((failed + 1))
  fi
}

for s in ctrl-c pipe-ctrl-c script-int script-term target-dir; do
  check "$s" scenario "$s"
done
check console-link console_link
check quiet-start quiet_start
check service-fails service_fails
rm -rf "$work"
echo "run.sh: $passed passed, $failed failed"
[ "$failed" = 0 ]
