#!/usr/bin/env bash
# Build robfig-cron-peer (next to this script) from Debian's packages of Go,
# robfig/cron v3 and amqp091-go, in GOPATH mode: no module proxy needed.
#   apt-get install golang golang-github-robfig-cron-dev golang-github-rabbitmq-amqp091-go-dev
set -euo pipefail
cd "$(dirname "$0")"
src=/usr/share/gocode
for need in "$src/src/github.com/robfig/cron/cron.go" "$src/src/github.com/rabbitmq/amqp091-go/channel.go"; do
  if ! command -v go >/dev/null || [[ ! -f $need ]]; then
    echo "robfig-cron peer: needs Debian's golang, golang-github-robfig-cron-dev and golang-github-rabbitmq-amqp091-go-dev" >&2
    exit 1
  fi
done
# GOPATH mode: the package's directory has no v3/ of its own, so a GOPATH
# of ours links it under its import path.
gopath=$(mktemp -d)
trap 'rm -rf "$gopath"' EXIT
mkdir -p "$gopath/src/github.com/robfig/cron"
ln -s "$src/src/github.com/robfig/cron" "$gopath/src/github.com/robfig/cron/v3"
GO111MODULE=off GOPATH="$gopath:$src" GOCACHE="${GOCACHE:-$PWD/.gocache}" go build -o robfig-cron-peer main.go
echo "built $PWD/robfig-cron-peer"
