#!/usr/bin/env bash
# A RabbitMQ node of its own, on loopback, for development and tests.
#
#   deploy/broker.sh start [--dir DIR] [--port N] [--name NAME] [--watch PID] [--tls]
#                          [--tls-verify-peer] [--listen IP]
#       Starts a node (installing Debian's rabbitmq-server first when missing and
#       running as root), waits until it serves, prints its AMQP URL as the last
#       line. --watch PID stops the node when process PID exits. --tls adds an
#       amqps listener with a throwaway CA (DIR/tls/ca.pem); see tls-url.
#       --tls-verify-peer (implies --tls) makes that listener require a client
#       certificate signed by the CA: DIR/tls/client.pem + client.key (CN
#       warren-client, also a user for EXTERNAL login, which it enables), and
#       DIR/tls/other-client.pem + .key signed by another CA (for refusal tests).
#       --listen IP also serves AMQP on IP (another loopback address, e.g. 127.0.0.2:
#       fault tests cut one client off by address without touching the others).
#   deploy/broker.sh stop [--dir DIR]      stops exactly the node started in DIR
#   deploy/broker.sh ctl [--dir DIR] ARGS  rabbitmqctl against that node
#   deploy/broker.sh url [--dir DIR]       prints the node's AMQP URL
#   deploy/broker.sh tls-url [--dir DIR]   prints its amqps URL (nodes started with --tls)
#   deploy/broker.sh cluster start|stop|urls|ctl N|kill N|restart N|cut N|heal N [--nodes 3] [--dir DIR]
#       a local cluster, one loopback address per node: see deploy/cluster.sh
#
# Each node has its own HOME (Erlang cookie), node name, AMQP and distribution
# ports, data and log directories: it never touches another node on the machine.
# Defaults: DIR=${TMPDIR:-/tmp}/warren-broker, port 5672, name warren-dev.
set -euo pipefail

RMQ_BIN=/usr/lib/rabbitmq/bin
cmd=${1:-}
shift || true
dir=${TMPDIR:-/tmp}/warren-broker
port=5672
name=warren-dev
watch=""
tls=""
verify_peer=""
extra_ip=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --watch) watch=$2; shift 2 ;;
    --tls) tls=1; shift ;;
    --tls-verify-peer) tls=1; verify_peer=1; shift ;;
    --listen) extra_ip=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

log() { echo "broker.sh: $*" >&2; }

install_if_missing() {
  [ -x "$RMQ_BIN/rabbitmq-server" ] && return 0
  if [ "$(id -u)" != 0 ]; then
    log "rabbitmq-server is not installed; run as root (it installs Debian's rabbitmq-server) or use 'docker compose up rabbitmq'"
    exit 1
  fi
  log "installing Debian's rabbitmq-server"
  export DEBIAN_FRONTEND=noninteractive
  # The package's postinst must not start the system node: it would take 5672.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq >&2
  apt-get install -y -qq rabbitmq-server >&2
  rm -f /usr/sbin/policy-rc.d
}

# A free port below Linux's ephemeral range (32768+), so that no outgoing
# connection or port-0 listener of another test takes it between this pick
# and the node binding it.
free_port() {
  python3 - <<'PY'
import random, socket, sys
for _ in range(200):
    p = random.randrange(10000, 32000)
    try:
        s = socket.socket(); s.bind(("0.0.0.0", p)); s.close()
    except OSError:
        continue
    print(p); break
else:
    sys.exit("no free port")
PY
}

# A CA and a server certificate for localhost/127.0.0.1, valid for a week.
make_certs() {
  local t="$dir/tls"
  mkdir -p "$t"
  openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=warren throwaway CA" \
    -keyout "$t/ca.key" -out "$t/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$t/server.key" -out "$t/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$t/ext.cnf"
  openssl x509 -req -in "$t/server.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
    -days 7 -extfile "$t/ext.cnf" -out "$t/server.pem" 2>/dev/null
}

# Client certificates for a node that verifies its peers: one signed by the
# node's CA (its CN is the user EXTERNAL logs in as), one by a stranger CA.
make_client_certs() {
  local t="$dir/tls"
  printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n' > "$t/client-ext.cnf"
  client_cert() { # NAME CA-PEM CA-KEY
    openssl req -newkey rsa:2048 -nodes -subj "/CN=warren-client" \
      -keyout "$t/$1.key" -out "$t/$1.csr" 2>/dev/null
    openssl x509 -req -in "$t/$1.csr" -CA "$2" -CAkey "$3" -CAcreateserial \
      -days 7 -extfile "$t/client-ext.cnf" -out "$t/$1.pem" 2>/dev/null
  }
  client_cert client "$t/ca.pem" "$t/ca.key"
  openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=warren stranger CA" \
    -keyout "$t/other-ca.key" -out "$t/other-ca.pem" 2>/dev/null
  client_cert other-client "$t/other-ca.pem" "$t/other-ca.key"
}

node_env() {
  # shellcheck disable=SC1091
  . "$dir/node.env"
  export HOME="$dir/home" RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$PORT" RABBITMQ_DIST_PORT="$DIST_PORT" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" ERL_CRASH_DUMP="$dir/erl_crash.dump" \
    RABBITMQ_PID_FILE="$dir/rabbit.pid" RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_CTL_DIST_PORT_MIN="$CTL_PORT" RABBITMQ_CTL_DIST_PORT_MAX="$((CTL_PORT + 10))"
}

ctl() { node_env; "$RMQ_BIN/rabbitmqctl" -n "$NODE" "$@"; }

start() {
  install_if_missing
  if [ -f "$dir/rabbit.pid" ] && kill -0 "$(cat "$dir/rabbit.pid")" 2>/dev/null; then
    log "a node already runs from $dir"
    url
    return 0
  fi
  [ "$port" = 0 ] && port=$(free_port)
  mkdir -p "$dir/home" "$dir/mnesia" "$dir/log"
  local dist ctlp tls_port=""
  dist=$(free_port)
  ctlp=$(free_port)
  [ -n "$tls" ] && tls_port=$(free_port)
  cat > "$dir/node.env" <<EOF
NODE=$name@localhost
PORT=$port
DIST_PORT=$dist
CTL_PORT=$ctlp
TLS_PORT=$tls_port
EOF
  cat > "$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$port
loopback_users.guest = true
log.console = false
log.file.level = warning
disk_free_limit.absolute = 50MB
EOF
  [ -n "$extra_ip" ] && echo "listeners.tcp.2 = $extra_ip:$port" >> "$dir/rabbitmq.conf"
  if [ -n "$tls" ]; then
    make_certs
    cat >> "$dir/rabbitmq.conf" <<EOF
listeners.ssl.default = 127.0.0.1:$tls_port
ssl_options.cacertfile = $dir/tls/ca.pem
ssl_options.certfile = $dir/tls/server.pem
ssl_options.keyfile = $dir/tls/server.key
EOF
    if [ -n "$verify_peer" ]; then
      make_client_certs
      cat >> "$dir/rabbitmq.conf" <<EOF
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = AMQPLAIN
auth_mechanisms.3 = EXTERNAL
ssl_cert_login_from = common_name
EOF
    else
      cat >> "$dir/rabbitmq.conf" <<EOF
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
EOF
    fi
  fi
  echo '[].' > "$dir/advanced.config"
  if [ -n "$verify_peer" ]; then
    echo '[rabbitmq_auth_mechanism_ssl].' > "$dir/enabled_plugins"
  else
    echo '[].' > "$dir/enabled_plugins"
  fi
  : > "$dir/rabbitmq-env.conf"
  node_env
  rm -f "$dir/rabbit.pid"
  setsid "$RMQ_BIN/rabbitmq-server" > "$dir/log/stdout.log" 2>&1 < /dev/null &
  local waited=0
  until [ -s "$dir/rabbit.pid" ]; do
    sleep 0.2
    waited=$((waited + 1))
    if [ $waited -gt 300 ]; then
      log "node did not write its pid file; see $dir/log"
      tail -20 "$dir/log/stdout.log" >&2 || true
      exit 1
    fi
  done
  if ! "$RMQ_BIN/rabbitmqctl" -n "$NODE" wait --timeout 120 "$dir/rabbit.pid" > /dev/null 2>&1; then
    log "node did not start; see $dir/log"
    tail -20 "$dir/log/stdout.log" >&2 || true
    exit 1
  fi
  if [ -n "$verify_peer" ]; then
    # The user of the client certificate's CN, for EXTERNAL login (no password).
    "$RMQ_BIN/rabbitmqctl" -n "$NODE" add_user warren-client "$(openssl rand -hex 16)" > /dev/null
    "$RMQ_BIN/rabbitmqctl" -n "$NODE" clear_password warren-client > /dev/null
    "$RMQ_BIN/rabbitmqctl" -n "$NODE" set_permissions -p / warren-client '.*' '.*' '.*' > /dev/null
  fi
  if [ -n "$watch" ]; then
    # Stop the node once the watched process is gone (test runs that crash).
    (trap '' HUP; while kill -0 "$watch" 2>/dev/null; do sleep 1; done; "$0" stop --dir "$dir") \
      > /dev/null 2>&1 < /dev/null &
    disown || true
  fi
  log "node $NODE serves AMQP on 127.0.0.1:$PORT (data: $dir)"
  url
}

url() {
  # shellcheck disable=SC1091
  . "$dir/node.env"
  echo "amqp://guest:guest@127.0.0.1:$PORT/%2f"
}

tls_url() {
  # shellcheck disable=SC1091
  . "$dir/node.env"
  [ -n "${TLS_PORT:-}" ] || { log "the node in $dir has no TLS listener (start it with --tls)"; exit 1; }
  echo "amqps://guest:guest@localhost:$TLS_PORT/%2f"
}

stop() {
  [ -f "$dir/node.env" ] || { log "no node in $dir"; return 0; }
  node_env
  if [ -f "$dir/rabbit.pid" ]; then
    local pid
    pid=$(cat "$dir/rabbit.pid")
    "$RMQ_BIN/rabbitmqctl" -n "$NODE" stop "$dir/rabbit.pid" > /dev/null 2>&1 || kill "$pid" 2>/dev/null || true
    rm -f "$dir/rabbit.pid"
  fi
  log "stopped $NODE"
}

case "$cmd" in
  install) install_if_missing ;;
  cluster) exec bash "$(dirname "$0")/cluster.sh" "$@" ;;
  start) start ;;
  stop) stop ;;
  ctl) ctl "$@" ;;
  url) url ;;
  tls-url) tls_url ;;
  *) sed -n '2,25p' "$0" >&2; exit 2 ;;
esac
