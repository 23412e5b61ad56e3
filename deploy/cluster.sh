#!/usr/bin/env bash
# A local RabbitMQ cluster on this machine, for development and fault tests.
# Called as `deploy/broker.sh cluster ...`:
#
#   cluster start [--nodes 3] [--dir DIR] [--name NAME] [--subnet 127.0.0] [--watch PID]
#       N clustered nodes, node i on its own loopback address SUBNET.(10+i)
#       (127.0.0.11, .12, .13), own AMQP and distribution ports, own data dir,
#       `cluster_partition_handling = pause_minority`, net_ticktime 10 s. Prints
#       the comma-separated AMQP URL list as its last line.
#   cluster stop [--dir DIR]            stops every node of that cluster
#   cluster urls [--dir DIR]            prints the URL list again
#   cluster url N [--dir DIR]           prints node N's URL
#   cluster ctl N ARGS... [--dir DIR]   rabbitmqctl on node N
#   cluster kill N [--dir DIR]          kill -9 of node N
#   cluster restart N [--dir DIR]       starts node N again (after kill); it rejoins
#   cluster cut N [--dir DIR]           nftables: node N loses its links to the other
#                                       nodes (client traffic is untouched)
#   cluster heal N [--dir DIR]          removes that cut
#
# Same isolation rules as a single node: own node names (NAME-i@address, long
# names), ports, cookie and data; it never touches another node. Default DIR is
# ${TMPDIR:-/tmp}/warren-cluster, default NAME warren-c.
set -euo pipefail

RMQ_BIN=/usr/lib/rabbitmq/bin
here=$(cd "$(dirname "$0")" && pwd)
cmd=${1:-}
shift || true
dir=${TMPDIR:-/tmp}/warren-cluster
nodes=3
name=warren-c
subnet=127.0.0
watch=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --subnet) subnet=$2; shift 2 ;;
    --watch) watch=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

log() { echo "cluster.sh: $*" >&2; }
die() { log "$*"; exit 2; }

# A free port below Linux's ephemeral range (32768+), so that no outgoing
# connection or port-0 listener of another test takes it between this pick
# and the node binding it.
free_port() {
  python3 - "$1" <<'PY'
import random, socket, sys
for _ in range(200):
    p = random.randrange(10000, 32000)
    try:
        for ip in (sys.argv[1], "0.0.0.0"):
            s = socket.socket(); s.bind((ip, p)); s.close()
    except OSError:
        continue
    print(p); break
else:
    sys.exit("no free port")
PY
}

# Loads node i's settings (written at start) into the environment the
# RabbitMQ scripts read.
node_env() {
  local i=$1
  [ -f "$dir/$i/node.env" ] || die "no node $i in $dir (cluster start first)"
  # shellcheck disable=SC1090
  . "$dir/$i/node.env"
  local d="$dir/$i"
  export HOME="$d/home" RABBITMQ_NODENAME="$NODE" RABBITMQ_USE_LONGNAME=true \
    RABBITMQ_NODE_IP_ADDRESS="$IP" RABBITMQ_NODE_PORT="$PORT" RABBITMQ_DIST_PORT="$DIST_PORT" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" ERL_CRASH_DUMP="$d/erl_crash.dump" \
    RABBITMQ_PID_FILE="$d/rabbit.pid" RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_CTL_DIST_PORT_MIN="$CTL_PORT" RABBITMQ_CTL_DIST_PORT_MAX="$((CTL_PORT + 10))"
}

ctl() {
  local i=$1
  shift
  (node_env "$i" && "$RMQ_BIN/rabbitmqctl" -n "$NODE" "$@")
}

count() { ls -d "$dir"/[0-9]* 2>/dev/null | wc -l; }

check_n() {
  [[ "${1:-}" =~ ^[0-9]+$ ]] && [ -f "$dir/$1/node.env" ] || die "no node '${1:-}' in $dir"
}

# Writes node i's configuration: its address, ports and the cluster's cookie.
configure() {
  local i=$1 ip=$subnet.$((10 + i)) d="$dir/$1"
  mkdir -p "$d/home" "$d/mnesia" "$d/log"
  local port dist ctlp
  port=$(free_port "$ip")
  dist=$(free_port "$ip")
  ctlp=$(free_port 127.0.0.1)
  cat > "$d/node.env" <<EOF
NODE=$name-$i@$ip
IP=$ip
PORT=$port
DIST_PORT=$dist
CTL_PORT=$ctlp
EOF
  cp "$dir/cookie" "$d/home/.erlang.cookie"
  chmod 400 "$d/home/.erlang.cookie"
  cat > "$d/rabbitmq.conf" <<EOF
listeners.tcp.1 = $ip:$port
loopback_users.guest = true
log.console = false
log.file.level = warning
disk_free_limit.absolute = 50MB
cluster_partition_handling = pause_minority
EOF
  # Inter-node traffic stays on the node's own address (so `cut` can drop it
  # by address); a 10 s tick notices a lost peer in ~10-15 s, not ~60 s.
  local erl_ip=${ip//./,}
  cat > "$d/advanced.config" <<EOF
[{kernel, [{inet_dist_use_interface, {$erl_ip}},
           {inet_dist_connect_options, [{ip, {$erl_ip}}]},
           {net_ticktime, 10}]}].
EOF
  echo '[].' > "$d/enabled_plugins"
  : > "$d/rabbitmq-env.conf"
}

# Starts node i's VM and waits until it serves.
boot() {
  local i=$1
  (
    node_env "$i"
    local d="$dir/$i"
    rm -f "$d/rabbit.pid"
    setsid "$RMQ_BIN/rabbitmq-server" > "$d/log/stdout.log" 2>&1 < /dev/null &
    local waited=0
    until [ -s "$d/rabbit.pid" ]; do
      sleep 0.2
      waited=$((waited + 1))
      if [ $waited -gt 300 ]; then
        log "node $i did not write its pid file; see $d/log"
        tail -20 "$d/log/stdout.log" >&2 || true
        exit 1
      fi
    done
    if ! "$RMQ_BIN/rabbitmqctl" -n "$NODE" wait --timeout 120 "$d/rabbit.pid" > /dev/null 2>&1; then
      log "node $i did not start; see $d/log"
      tail -20 "$d/log/stdout.log" >&2 || true
      exit 1
    fi
  )
}

node_url() {
  local i=$1
  (node_env "$i" && echo "amqp://guest:guest@$IP:$PORT/%2f")
}

urls() {
  local n out=()
  n=$(count)
  [ "$n" -gt 0 ] || die "no cluster in $dir"
  for i in $(seq 1 "$n"); do out+=("$(node_url "$i")"); done
  (IFS=,; echo "${out[*]}")
}

start() {
  [[ "$nodes" =~ ^[0-9]+$ ]] && [ "$nodes" -ge 1 ] || die "--nodes must be a number ≥ 1"
  [[ "$subnet" =~ ^127\.[0-9]+\.[0-9]+$ ]] || die "--subnet must be a 127.x.y loopback prefix, not '$subnet'"
  if [ -f "$dir/1/rabbit.pid" ] && kill -0 "$(cat "$dir/1/rabbit.pid")" 2>/dev/null; then
    log "a cluster already runs from $dir"
    urls
    return 0
  fi
  bash "$here/broker.sh" install
  mkdir -p "$dir"
  printf '%s' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$dir/cookie"
  local i
  for i in $(seq 1 "$nodes"); do configure "$i"; done
  # Boot in parallel: each takes ~4 s, and a node waits for its peers anyway.
  local pids=()
  for i in $(seq 1 "$nodes"); do boot "$i" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || { log "a node failed to boot"; stop; exit 1; }; done
  local first
  first=$(node_env 1 && echo "$NODE")
  for i in $(seq 2 "$nodes"); do
    ctl "$i" stop_app > /dev/null
    ctl "$i" join_cluster "$first" > /dev/null
    ctl "$i" start_app > /dev/null
  done
  if [ -n "$watch" ]; then
    (trap '' HUP; while kill -0 "$watch" 2>/dev/null; do sleep 1; done; "$0" stop --dir "$dir") \
      > /dev/null 2>&1 < /dev/null &
    disown || true
  fi
  log "cluster of $nodes nodes ($name-1..$nodes@$subnet.11..) in $dir"
  urls
}

kill_node() {
  local i=$1
  check_n "$i"
  local pid
  pid=$(cat "$dir/$i/rabbit.pid" 2>/dev/null || true)
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  # epmd may still list the dead node for a moment; a restart re-registers.
  log "killed node $i${pid:+ (pid $pid)}"
}

restart_node() {
  local i=$1
  check_n "$i"
  if [ -f "$dir/$i/rabbit.pid" ] && kill -0 "$(cat "$dir/$i/rabbit.pid")" 2>/dev/null; then
    ctl "$i" stop > /dev/null 2>&1 || true
  fi
  boot "$i"
  log "node $i is back"
}

table() { echo "warren_cluster_$(printf '%s' "$dir" | cksum | cut -d' ' -f1)_$1"; }

cut_node() {
  local i=$1
  check_n "$i"
  command -v nft > /dev/null || die "nft is missing: apt-get install nftables"
  local me others=() j n
  me=$(node_env "$i" && echo "$IP")
  n=$(count)
  for j in $(seq 1 "$n"); do
    [ "$j" = "$i" ] || others+=("$(node_env "$j" && echo "$IP")")
  done
  local set
  set=$(IFS=,; echo "${others[*]}")
  local t
  t=$(table "$i")
  nft delete table inet "$t" 2> /dev/null || true
  nft -f - <<EOF
table inet $t {
  chain out {
    type filter hook output priority 0; policy accept;
    ip saddr $me ip daddr { $set } drop
    ip saddr { $set } ip daddr $me drop
  }
}
EOF
  log "cut node $i ($me) off from $set"
}

heal_node() {
  local i=$1
  check_n "$i"
  nft delete table inet "$(table "$i")" 2> /dev/null || true
  log "healed node $i"
}

stop() {
  local n i
  n=$(count)
  [ "$n" -gt 0 ] || { log "no cluster in $dir"; return 0; }
  for i in $(seq 1 "$n"); do heal_node "$i" 2> /dev/null || true; done
  for i in $(seq 1 "$n"); do
    (
      node_env "$i"
      local d="$dir/$i"
      if [ -f "$d/rabbit.pid" ]; then
        pid=$(cat "$d/rabbit.pid")
        "$RMQ_BIN/rabbitmqctl" -n "$NODE" stop "$d/rabbit.pid" > /dev/null 2>&1 || kill -KILL "$pid" 2> /dev/null || true
        rm -f "$d/rabbit.pid"
      fi
    ) &
  done
  wait
  log "stopped the cluster in $dir"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  urls) urls ;;
  url) check_n "${args[0]:-}"; node_url "${args[0]}" ;;
  ctl) check_n "${args[0]:-}"; ctl "${args[0]}" "${args[@]:1}" ;;
  kill) kill_node "${args[0]:-}" ;;
  restart) restart_node "${args[0]:-}" ;;
  cut) cut_node "${args[0]:-}" ;;
  heal) heal_node "${args[0]:-}" ;;
  *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
