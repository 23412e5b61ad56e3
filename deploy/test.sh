#!/usr/bin/env bash
# The test command: lints, then every unit and integration test against one
# throwaway RabbitMQ node for the whole run (installed from Debian when
# missing), stopped at the end. Extra arguments go to `cargo nextest run`.
set -euo pipefail
cd "$(dirname "$0")/.."

# rabbitmq-server for the broker; prometheus for promtool, which lints /metrics
# and the alert rules; nftables for the test that cuts a producer off the
# network; openssl for TLS; faketime for the clock-step test; chromium and
# chromium-driver for the console's browser tests; python3 with
# PyYAML for the manifest and docs checks; tini for the image's init check.
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || ! command -v promtool >/dev/null \
  || ! command -v nft >/dev/null || ! command -v openssl >/dev/null || ! command -v faketime >/dev/null \
  || ! command -v tini >/dev/null || ! command -v chromedriver >/dev/null || ! python3 -c 'import yaml' >/dev/null 2>&1 \
  || ! python3 -c 'import pika' >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get update -qq
    apt-get install -y -qq rabbitmq-server prometheus nftables openssl python3 python3-yaml python3-pika faketime tini chromium chromium-driver >/dev/null
    rm -f /usr/sbin/policy-rc.d
  else
    echo "test.sh: install rabbitmq-server (Debian package) or run as root" >&2
    exit 1
  fi
fi
# A python3 other than Debian's (pyenv) does not see python3-yaml.
python3 -c 'import yaml' >/dev/null 2>&1 || python3 -m pip install -q pyyaml
# pika: the signed-publisher example of docs/contract.md runs in the consumer tests.
python3 -c 'import pika' >/dev/null 2>&1 || python3 -m pip install -q pika
if ! command -v cargo-nextest >/dev/null; then
  cargo install --locked cargo-nextest
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
cargo build --workspace --all-targets --all-features

node_dir=$(mktemp -d -t warren-test-broker.XXXXXX)
cleanup() { bash deploy/broker.sh stop --dir "$node_dir" || true; rm -rf "$node_dir"; }
trap cleanup EXIT
WARREN_TEST_AMQP_URL=$(bash deploy/broker.sh start --dir "$node_dir" --port 0 --name "warren-test-$$" --watch $$ | tail -n 1)
export WARREN_TEST_AMQP_URL

status=0
cargo nextest run --workspace --all-features --no-fail-fast "$@" || status=$?
# nextest does not run doctests (the README-style examples in the crates).
cargo test --workspace --all-features --doc --quiet || status=$?
# The scripts people run: deploy/run.sh starts and stops cleanly however it
# is signalled (uses the debug binaries built above).
bash deploy/tests/run-sh.sh || status=$?
# deploy/heal-delays.sh heals quorum delay levels whose dead-letter worker is
# gone or stalled (a node of its own; about 50 s).
bash deploy/tests/heal-delays.sh || status=$?
# Deploy files (alerts, manifests, dashboard metric names against a live
# scrape) and docs (links, documented commands and flags) cannot drift.
bash deploy/tests/deploy-checks.sh || status=$?
bash deploy/tests/docs-check.sh || status=$?
exit "$status"
