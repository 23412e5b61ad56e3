#!/usr/bin/env bash
# Checks the deploy files against each other and against the real binaries:
#
#   * Prometheus: promtool check config / check rules / test rules, and every
#     alert has a unit test that makes it fire;
#   * Grafana: the dashboard is valid, its panels do not overlap, every query
#     parses as PromQL (promtool), queue-depth and dead-letter-depth panels exist;
#   * Kubernetes: every manifest parsed with PyYAML; kustomization resources,
#     kinds, selectors vs pod labels, Service/probe/annotation ports vs container
#     ports, Secret/ConfigMap references, KEDA vs `replicas`, grace periods vs
#     drain grace, containers keep the image's ENTRYPOINT (tini); then both
#     binaries are started with the ConfigMap's config files and the manifests'
#     environment (unknown keys stop them with exit 2) until /readyz says 200.
#     `kubectl kustomize` too when kubectl is installed (Debian 12's
#     kubernetes-client is 1.20 and later Debian releases have none, so the
#     PyYAML checks are the ones CI can rely on);
#   * Dockerfile / compose: tini is PID 1 and reaps the orphans an `exec`
#     handler leaves behind (run for real in a PID namespace with the
#     Dockerfile's ENTRYPOINT), images pinned, stop_grace_period >= shutdown;
#   * metrics: a producer (with a 1 s schedule) and a consumer (noop handler)
#     run a task; every warren_* name that alerts.yml and the dashboard use must
#     appear in their /metrics (rabbitmq_* names come from RabbitMQ's own
#     exporter, warren_delay_healer_* from deploy/heal-delays.sh: listed, not
#     required; this node need not have the plugin).
#
#   bash deploy/tests/deploy-checks.sh      (from the repo root)
#
# Needs the debug warren-producer and warren-consumer (cargo build; found in
# cargo's target directory, CARGO_TARGET_DIR included), promtool
# (Debian: prometheus), python3 with PyYAML (python3-yaml), tini, unshare
# (util-linux) and root or user namespaces. Uses the broker at
# WARREN_TEST_AMQP_URL, or starts one of its own. Objects on the broker get a
# prefix of their own. Prints one line per check, then
# "deploy checks: N passed, N failed"; exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."

DEADLINE=${DEPLOY_CHECKS_DEADLINE:-20} # seconds any awaited condition may take
target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin=${target_dir:-${CARGO_TARGET_DIR:-target}}/debug
work=$(mktemp -d -t warren-deploy-checks.XXXXXX)
prefix="deploychecks-$$-$RANDOM"
passed=0
failed=0
started=()
broker_dir=""

pass() { echo "ok    $1"; passed=$((passed + 1)); }
fail() {
  echo "FAIL  $1"
  if [ -n "${2:-}" ]; then printf '%s\n' "$2" | sed 's/^/      /'; fi
  failed=$((failed + 1))
}
# Run a command as one check; its output is shown only when it fails.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$out"; return 1; fi
}
# Count the "ok"/"FAIL" lines of the Python checks, echoing everything.
tally() {
  local line
  while IFS= read -r line; do
    echo "$line"
    case "$line" in
      "ok "*) passed=$((passed + 1)) ;;
      "FAIL "*) failed=$((failed + 1)) ;;
    esac
  done
}

# SIGTERM to every process started (they drain in parallel), SIGKILL to
# whatever still runs after DEADLINE.
stop_all() {
  local pid i alive
  for pid in "${started[@]}"; do
    # `unshare --fork` ignores SIGTERM while it waits: signal its child (the
    # namespace's PID 1, tini), which forwards it to warren.
    if [ "$(ps -o comm= -p "$pid")" = unshare ]; then
      kill -TERM $(ps -o pid= --ppid "$pid") 2>/dev/null
    fi
    kill -TERM "$pid" 2>/dev/null
  done
  for ((i = 0; i < DEADLINE * 10; i++)); do
    alive=""
    for pid in "${started[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.1
  done
  for pid in "${started[@]}"; do
    if kill -KILL "$pid" 2>/dev/null; then echo "deploy-checks: killed pid $pid after ${DEADLINE}s" >&2; fi
    wait "$pid" 2>/dev/null
  done
}
cleanup() {
  stop_all
  if [ -n "$broker_dir" ]; then
    bash deploy/broker.sh stop --dir "$broker_dir" >/dev/null 2>&1
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# GET a URL; prints the body, fails unless the status is 200.
http_get() {
  python3 -c 'import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        sys.stdout.write(r.read().decode())
except Exception as e:
    sys.exit(f"GET {sys.argv[1]}: {e}")' "$1"
}
# Wait until `cmd...` succeeds (every 0.1 s), at most DEADLINE seconds.
await() {
  local i
  for ((i = 0; i < DEADLINE * 10; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
# Start a binary in the background with a clean environment plus "$env[@]".
# Sets $last_pid; output goes to $work/$name.log.
launch() {
  local name=$1
  shift
  env -i PATH="$PATH" WARREN_AMQP_URL="$amqp_url" "$@" >"$work/$name.log" 2>&1 &
  last_pid=$!
  started+=("$last_pid")
}
# Wait for /readyz = 200 on a port, or for the process to exit.
await_ready() { # name pid port
  local i
  for ((i = 0; i < DEADLINE * 10; i++)); do
    if ! kill -0 "$2" 2>/dev/null; then
      wait "$2"
      echo "$1 exited with code $?:"
      tail -n 5 "$work/$1.log"
      return 1
    fi
    http_get "http://127.0.0.1:$3/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$1 not ready on :$3 within ${DEADLINE}s:"
  tail -n 5 "$work/$1.log"
  return 1
}

# The file checks, in Python (PyYAML, tomllib); `mode` picks the part.
read -r -d '' PY <<'PY'
import json, os, re, sys, tomllib
from pathlib import Path
try:
    import yaml
except ImportError:
    print("FAIL  python3 has no PyYAML: install python3-yaml (Debian)")
    sys.exit(0)

mode, work = sys.argv[1], Path(sys.argv[2])
results = []

def check(name):
    """Decorator: run the function now; it returns a list of problems."""
    def run(fn):
        try:
            problems = fn()
        except Exception as e:  # a broken file is a failed check, not a crash
            problems = [f"{type(e).__name__}: {e}"]
        if problems:
            print(f"FAIL  {name}")
            for p in problems:
                print(f"      {p}")
        else:
            print(f"ok    {name}")
    return run

def duration_s(text):
    """humantime-style duration ("30s", "1m 30s", "500ms") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)\b", str(text))
    if not parts:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)

METRIC = re.compile(r"(?<![\w:])((?:warren|rabbitmq)_[a-zA-Z0-9_]+)")

def alerts():
    return yaml.safe_load(open("deploy/prometheus/alerts.yml"))

def dashboard():
    return json.load(open("deploy/grafana/warren-dashboard.json"))

def dashboard_queries(d):
    for p in d["panels"]:
        for t in p.get("targets", []):
            if t.get("expr"):
                yield f'panel {p["id"]} "{p["title"]}" {t["refId"]}', t["expr"]

def referenced_names():
    names = set()
    for g in alerts()["groups"]:
        for r in g["rules"]:
            names.update(METRIC.findall(r["expr"]))
    d = dashboard()
    for _, e in dashboard_queries(d):
        names.update(METRIC.findall(e))
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        names.update(METRIC.findall(json.dumps(q) + str(v.get("definition", ""))))
    return names

# ---------------------------------------------------------------- static
def static():
    @check("alerts: every alert has a promtool test that makes it fire")
    def _():
        tests = yaml.safe_load(open("deploy/prometheus/alerts_test.yml"))
        fired = {a["alertname"] for t in tests["tests"] for a in t.get("alert_rule_test", [])
                 if a.get("exp_alerts")}
        return [f"{r['alert']} has no test with exp_alerts"
                for g in alerts()["groups"] for r in g["rules"]
                if "alert" in r and r["alert"] not in fired]

    @check("dashboard: valid JSON, unique panel ids, no overlapping panels")
    def _():
        d, problems, seen, cells = dashboard(), [], set(), {}
        for p in d["panels"]:
            if p["id"] in seen:
                problems.append(f"panel id {p['id']} used twice")
            seen.add(p["id"])
            g = p["gridPos"]
            if g["x"] + g["w"] > 24:
                problems.append(f"panel {p['id']} is wider than the grid")
            for y in range(g["y"], g["y"] + g["h"]):
                for x in range(g["x"], g["x"] + g["w"]):
                    if (x, y) in cells:
                        problems.append(f"panel {p['id']} overlaps panel {cells[(x, y)]}")
                        break
                    cells[(x, y)] = p["id"]
                else:
                    continue
                break
        return problems

    @check("dashboard: queue-depth and dead-letter-queue-depth panels (RabbitMQ metrics)")
    def _():
        exprs = [e for _, e in dashboard_queries(dashboard())]
        problems = []
        if not any("queue_messages_ready" in e for e in exprs):
            problems.append("no panel shows rabbitmq_*queue_messages_ready (work queue depth)")
        if not any("queue_messages" in e and '.dead"' in e for e in exprs):
            problems.append("no panel shows the depth of the <prefix>.dead queue")
        return problems

    # Every dashboard query as a recording rule, for `promtool check rules`.
    try:
        d = dashboard()
    except Exception:
        d = {"panels": []}  # reported by the checks above
    variables = {v["name"]: "warren" if v["name"] == "prefix" else ".*"
                 for v in d.get("templating", {}).get("list", [])}
    rules = []
    for where, e in dashboard_queries(d):
        e = re.sub(r"\$__(rate_interval|interval|range)", "5m", e)
        e = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), e)
        rules.append({"record": "dashboard:" + re.sub(r"\W+", "_", where).strip("_").lower(),
                      "expr": e})
    (work / "dashboard-rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    for part in (k8s_checks, compose_checks):
        try:
            part()
        except Exception as e:  # a file too broken to even start its checks
            print(f"FAIL  {part.__name__}: {type(e).__name__}: {e}")

# ------------------------------------------------------------------- k8s
CORE = {("v1", "Namespace"), ("v1", "Secret"), ("v1", "ConfigMap"), ("apps/v1", "Deployment"),
        ("v1", "Service"), ("policy/v1", "PodDisruptionBudget")}
CRD = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
       ("monitoring.coreos.com/v1", "ServiceMonitor")}
ROLE_SHUTDOWN_S = {"producer": 15}  # producer: 10 s for its tasks + 5 s for HTTP

def k8s_docs():
    out = {}
    for f in sorted(Path("deploy/k8s").glob("*.yaml")):
        out[f.name] = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
    return out

def by_kind(docs, kind):
    return [d for ds in docs.values() for d in ds if d.get("kind") == kind]

def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

def containers(dep):
    return dep["spec"]["template"]["spec"]["containers"]

def k8s_checks():
    docs = k8s_docs()
    deps = by_kind(docs, "Deployment")
    secrets = {s["metadata"]["name"]: {**s.get("stringData", {}), **s.get("data", {})}
               for s in by_kind(docs, "Secret")}
    cms = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind(docs, "ConfigMap")}
    ns = {n["metadata"]["name"] for n in by_kind(docs, "Namespace")}

    @check("k8s: every document has a known apiVersion/kind, a name and the namespace")
    def _():
        problems = []
        for f, ds in docs.items():
            for d in ds:
                key = (d.get("apiVersion"), d.get("kind"))
                if key == ("kustomize.config.k8s.io/v1beta1", "Kustomization"):
                    continue
                if key not in CORE | CRD:
                    problems.append(f"{f}: unknown {key}")
                if not d.get("metadata", {}).get("name"):
                    problems.append(f"{f}: a {key[1]} without metadata.name")
                if key[1] != "Namespace" and d["metadata"].get("namespace") not in ns:
                    problems.append(f"{f}: {key[1]} {d['metadata'].get('name')} is not in "
                                    f"namespace {sorted(ns)}")
        return problems

    @check("k8s: kustomization lists exactly the core manifests (CRD ones apart)")
    def _():
        kust = yaml.safe_load(open("deploy/k8s/kustomization.yaml"))
        listed = kust.get("resources", [])
        problems = [f"{r}: listed but missing" for r in listed if not Path("deploy/k8s", r).exists()]
        for f, ds in docs.items():
            kinds = {(d.get("apiVersion"), d.get("kind")) for d in ds}
            if f == "kustomization.yaml":
                continue
            if kinds <= CORE and f not in listed:
                problems.append(f"{f}: core resources not in kustomization.yaml")
            if kinds & CRD and f in listed:
                problems.append(f"{f}: needs a CRD (KEDA/prometheus-operator) but is in "
                                "kustomization.yaml, so `apply -k` fails without it")
        return problems

    @check("k8s: selectors match pod labels (Deployments, Services, PDBs, spreads)")
    def _():
        problems = []
        pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in deps}
        for d in deps:
            name, labels = d["metadata"]["name"], pods[d["metadata"]["name"]]
            if not matches(d["spec"]["selector"]["matchLabels"], labels):
                problems.append(f"Deployment {name}: selector does not match its pod labels")
            spec = d["spec"]["template"]["spec"]
            sels = [c["labelSelector"]["matchLabels"] for c in spec.get("topologySpreadConstraints", [])]
            for a in spec.get("affinity", {}).get("podAntiAffinity", {}).get(
                    "preferredDuringSchedulingIgnoredDuringExecution", []):
                sels.append(a["podAffinityTerm"]["labelSelector"]["matchLabels"])
            problems += [f"Deployment {name}: spread/anti-affinity selector {s} misses its own pods"
                         for s in sels if not matches(s, labels)]
        for kind, path in (("Service", ("spec", "selector")),
                           ("PodDisruptionBudget", ("spec", "selector", "matchLabels"))):
            for o in by_kind(docs, kind):
                sel = o
                for p in path:
                    sel = sel.get(p, {})
                hit = [n for n, l in pods.items() if matches(sel, l)]
                if len(hit) != 1:
                    problems.append(f"{kind} {o['metadata']['name']}: selector {sel} matches "
                                    f"{hit or 'no Deployment'}")
        svcs = by_kind(docs, "Service")
        for sm in by_kind(docs, "ServiceMonitor"):
            hit = [s for s in svcs if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
            if not hit:
                problems.append(f"ServiceMonitor {sm['metadata']['name']} selects no Service")
            for s in hit:
                names = {p.get("name") for p in s["spec"]["ports"]}
                problems += [f"ServiceMonitor {sm['metadata']['name']}: port {e['port']} not on "
                             f"Service {s['metadata']['name']}"
                             for e in sm["spec"]["endpoints"] if e["port"] not in names]
        return problems

    @check("k8s: Service, probe, scrape and WARREN_HTTP_ADDR ports are container ports")
    def _():
        problems = []
        for d in deps:
            name = d["metadata"]["name"]
            ports = {(p.get("name"), p["containerPort"]) for c in containers(d) for p in c.get("ports", [])}
            pnames, pnums = {n for n, _ in ports}, {n for _, n in ports}
            for c in containers(d):
                for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                    port = c.get(probe, {}).get("httpGet", {}).get("port")
                    if port is not None and port not in pnames | pnums:
                        problems.append(f"{name}: {probe} port {port} is not a container port")
                for e in c.get("env", []):
                    if e["name"] == "WARREN_HTTP_ADDR" and int(e["value"].rsplit(":", 1)[1]) not in pnums:
                        problems.append(f"{name}: WARREN_HTTP_ADDR {e['value']} is not a container port")
            ann = d["spec"]["template"]["metadata"].get("annotations", {})
            if "prometheus.io/port" in ann and int(ann["prometheus.io/port"]) not in pnums:
                problems.append(f"{name}: prometheus.io/port {ann['prometheus.io/port']} is not a container port")
            for s in by_kind(docs, "Service"):
                if matches(s["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]):
                    for p in s["spec"]["ports"]:
                        if p.get("targetPort", p["port"]) not in pnames | pnums:
                            problems.append(f"Service {s['metadata']['name']}: targetPort "
                                            f"{p.get('targetPort')} is not a port of {name}")
        return problems

    @check("k8s: Secret, ConfigMap and volume references resolve")
    def _():
        problems = []
        for d in deps:
            name, spec = d["metadata"]["name"], d["spec"]["template"]["spec"]
            vols = {v["name"]: v for v in spec.get("volumes", [])}
            for c in containers(d):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref and ref["key"] not in secrets.get(ref["name"], {}):
                        problems.append(f"{name}: env {e['name']}: no key {ref['key']} in Secret {ref['name']}")
                for e in c.get("envFrom", []):
                    if "secretRef" in e and e["secretRef"]["name"] not in secrets:
                        problems.append(f"{name}: envFrom Secret {e['secretRef']['name']} does not exist")
                problems += [f"{name}: volumeMount {m['name']} has no volume"
                             for m in c.get("volumeMounts", []) if m["name"] not in vols]
            for v in vols.values():
                cm = v.get("configMap")
                if cm:
                    if cm["name"] not in cms:
                        problems.append(f"{name}: ConfigMap {cm['name']} does not exist")
                    problems += [f"{name}: no key {i['key']} in ConfigMap {cm['name']}"
                                 for i in cm.get("items", []) if i["key"] not in cms.get(cm["name"], {})]
        for t in by_kind(docs, "TriggerAuthentication"):
            for r in t["spec"].get("secretTargetRef", []):
                if r["key"] not in secrets.get(r["name"], {}):
                    problems.append(f"TriggerAuthentication {t['metadata']['name']}: no key "
                                    f"{r['key']} in Secret {r['name']}")
        return problems

    @check("k8s: containers set args, not command (keeps the image's tini ENTRYPOINT)")
    def _():
        return [f"{d['metadata']['name']}/{c['name']}: `command` replaces the ENTRYPOINT "
                "(tini, the reaper of exec handlers' orphans); use `args`"
                for d in deps for c in containers(d) if "command" in c]

    def consumer_cfg():
        return tomllib.loads(cms["warren-config"]["consumer.toml"])

    @check("k8s: KEDA owns the consumer replica count and watches its work queue")
    def _():
        problems = []
        prefix = consumer_cfg().get("topology", {}).get("prefix", "warren")
        for so in by_kind(docs, "ScaledObject"):
            ref = so["spec"]["scaleTargetRef"]
            target = [d for d in deps if d["metadata"]["name"] == ref["name"]]
            if ref.get("kind", "Deployment") != "Deployment" or not target:
                problems.append(f"ScaledObject {so['metadata']['name']}: no Deployment {ref['name']}")
            for d in target:
                if "replicas" in d["spec"]:
                    problems.append(f"Deployment {ref['name']} sets replicas "
                                    f"({d['spec']['replicas']}) although ScaledObject "
                                    f"{so['metadata']['name']} scales it: every apply resets the fleet")
            for t in so["spec"]["triggers"]:
                q = t["metadata"].get("queueName", "")
                if t["type"] == "rabbitmq" and not q.startswith(prefix + "."):
                    problems.append(f"ScaledObject trigger queue {q} is not a {prefix}.* queue")
        return problems

    @check("k8s: terminationGracePeriodSeconds covers each role's shutdown")
    def _():
        problems = []
        need = dict(ROLE_SHUTDOWN_S)
        need["consumer"] = duration_s(consumer_cfg().get("worker", {}).get("drain_grace", "30s")) + 5
        for d in deps:
            role = d["metadata"]["name"].removeprefix("warren-")
            grace = d["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
            if role in need and grace <= need[role]:
                problems.append(f"{d['metadata']['name']}: terminationGracePeriodSeconds {grace} "
                                f"<= its shutdown ({need[role]:.0f} s)")
        return problems

    # For the live check: each role's config file (mapped from /etc/warren to
    # the work dir), args and environment, with Secret values and placeholders.
    for d in deps:
        role = d["metadata"]["name"].removeprefix("warren-")
        c, spec = containers(d)[0], d["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        files = {}
        for m in c.get("volumeMounts", []):
            cm = vols[m["name"]].get("configMap")
            for i in (cm or {}).get("items", []):
                dst = work / "k8s" / i["path"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_text(cms[cm["name"]][i["key"]])
                files[f"{m['mountPath']}/{i['path']}"] = str(dst)
        args = [files.get(a, a) for a in c.get("args", c.get("command", []))]
        env = {}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            elif "secretKeyRef" in e.get("valueFrom", {}):
                r = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = secrets[r["name"]][r["key"]]
            else:
                env[e["name"]] = f"deploy-checks-{role}"  # fieldRef: the pod name
        for e in c.get("envFrom", []):
            env.update(secrets.get(e.get("secretRef", {}).get("name"), {}))
        (work / f"k8s-{role}.json").write_text(json.dumps({"args": args, "env": env}))

# --------------------------------------------------------------- compose
def compose_checks():
    comp = yaml.safe_load(open("docker-compose.yml"))
    svcs = comp["services"]

    @check("compose: every pulled image is pinned to an exact version")
    def _():
        return [f"{n}: image {s['image']} floats (want e.g. name:1.2.3)"
                for n, s in svcs.items() if "image" in s and "build" not in s
                and not s["image"].startswith("warren:")
                and not re.search(r":v?\d+\.\d+\.\d+([-.][\w.-]+)?$", s["image"])]

    @check("compose: stop_grace_period covers each role's shutdown")
    def _():
        cfg = tomllib.loads(Path("deploy/consumer.toml").read_text())
        need = dict(ROLE_SHUTDOWN_S)
        need["consumer"] = duration_s(cfg.get("worker", {}).get("drain_grace", "30s")) + 5
        problems = []
        for role, s in need.items():
            grace = duration_s(svcs[role].get("stop_grace_period", "10s"))
            if grace <= s:
                problems.append(f"{role}: stop_grace_period {grace:.0f} s <= its shutdown ({s:.0f} s)")
        return problems

    @check("compose: warren services keep the ENTRYPOINT; mounted files exist")
    def _():
        problems = [f"{n}: `entrypoint` replaces tini" for n in ("producer", "consumer")
                    if "entrypoint" in svcs[n]]
        for n, s in svcs.items():
            for v in s.get("volumes", []):
                src = v.split(":")[0]
                if src.startswith(".") and not Path(src).exists():
                    problems.append(f"{n}: mounts {src}, which does not exist")
        return problems

    @check("Dockerfile: the runtime image installs tini and runs it as ENTRYPOINT")
    def _():
        text = Path("Dockerfile").read_text()
        runtime = text[text.rindex("\nFROM "):]
        entry = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", runtime, re.M)
        problems = []
        if not re.search(r"apt-get install[^\n]*(\\\n[^\n]*)*\btini\b", runtime):
            problems.append("the runtime stage does not install Debian's tini")
        if not entry or "tini" not in json.loads(entry[-1])[0]:
            problems.append("no ENTRYPOINT running tini in the runtime stage")
        else:
            (work / "entrypoint.json").write_text(entry[-1])
        return problems

# --------------------------------------------------------------- metrics
def scraped(path):
    """Sample names and # TYPE families of a Prometheus text scrape."""
    samples, types = set(), {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            samples.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return samples, types

def metrics():
    scrapes = {role: scraped(work / f"{role}.metrics") for role in ("producer", "consumer")}
    names = sorted(referenced_names())
    for name in names:
        if name.startswith("rabbitmq_"):
            print(f"      (exempt) {name}: RabbitMQ's own exporter")
            continue
        if name.startswith("warren_delay_healer_"):
            # Written by deploy/heal-delays.sh (checked in its own test).
            print(f"      (exempt) {name}: deploy/heal-delays.sh's textfile")
            continue
        # A sample name, so a histogram must be used as _bucket/_sum/_count
        # (its bare family name has no samples) and a counter with its _total.
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        where = [r for r, (s, t) in scrapes.items() if name in s]
        kinds = {t.get(family) or t.get(name) for r, (s, t) in scrapes.items() if r in where}
        if where:
            print(f"ok    metric {name} ({'/'.join(sorted(k for k in kinds if k))}, {', '.join(where)})")
        else:
            hint = [f"{family} is a {t[family]} in the {r} scrape"
                    for r, (s, t) in scrapes.items() if family in t]
            print(f"FAIL  metric {name}: used by alerts.yml or the dashboard, in no /metrics scrape"
                  + (f" ({'; '.join(hint)})" if hint else ""))

{"static": static, "metrics": metrics}[mode]()
PY

# ------------------------------------------------------------ file checks
echo "== Prometheus, Grafana, Kubernetes, compose, Dockerfile"
check "promtool check config deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
check "promtool check rules deploy/prometheus/alerts.yml" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml
tally < <(python3 -c "$PY" static "$work")
if [ -f "$work/dashboard-rules.yml" ]; then
  check "dashboard: every query parses (promtool)" promtool check rules "$work/dashboard-rules.yml"
fi
if command -v kubectl >/dev/null; then
  check "kubectl kustomize deploy/k8s renders" kubectl kustomize deploy/k8s
else
  echo "skip  kubectl kustomize (no kubectl; the PyYAML checks above cover deploy/k8s)"
fi

# ------------------------------------------------------------ live checks
echo "== live: the binaries with these files, on a real broker"
for b in warren-producer warren-consumer; do
  if [ ! -x "$bin/$b" ]; then
    fail "$bin/$b exists" "build it first: cargo build --bin warren-producer --bin warren-consumer"
  fi
done
amqp_url=${WARREN_TEST_AMQP_URL:-}
if [ -z "$amqp_url" ] && [ -x "$bin/warren-consumer" ]; then
  broker_dir="$work/broker"
  amqp_url=$(bash deploy/broker.sh start --dir "$broker_dir" --port 0 --name "warren-deploy-checks-$$" --watch $$ 2>"$work/broker-start.log" | tail -n 1)
fi

if [ -n "$amqp_url" ] && [ -x "$bin/warren-producer" ] && [ -x "$bin/warren-consumer" ]; then
  # 1. Each role with the ConfigMap's file and the manifest's environment.
  declare -A k8s_pid k8s_port
  for role in producer consumer; do
    [ -f "$work/k8s-$role.json" ] || continue
    mapfile -t spec < <(python3 -c 'import json, sys
s = json.load(open(sys.argv[1]))
print(len(s["args"]))
print(*s["args"], sep="\n")
for k, v in s["env"].items():
    print(f"{k}={v}")' "$work/k8s-$role.json")
    nargs=${spec[0]}
    args=("${spec[@]:1:nargs}")
    envs=("${spec[@]:1+nargs}")
    k8s_port[$role]=$(free_port)
    # The manifest's broker URL and listen address are placeholders for a
    # cluster: replaced by the test broker and a free loopback port.
    launch "k8s-$role" "${envs[@]}" WARREN_AMQP_URL="$amqp_url" \
      WARREN_HTTP_ADDR="127.0.0.1:${k8s_port[$role]}" WARREN_TOPOLOGY__PREFIX="$prefix-k8s" \
      "$bin/${args[0]}" "${args[@]:1}"
    k8s_pid[$role]=$last_pid
  done

  # 2. A producer firing a 1 s schedule and a consumer with a noop handler.
  #    A workflow, a limit and a breaker-guarded http handler (never
  #    called) make their series appear, so the alerts and panels on them
  #    are checked too.
  cat >"$work/producer.toml" <<'EOF'
[[schedules]]
name = "deploy-checks"
cron = "@every 1s"
task = "deploy.tick"

[[workflows]]
name = "deploy-flow"
[[workflows.steps]]
name = "only"
task = "deploy.step"
EOF
  cat >"$work/consumer.toml" <<'EOF'
[handlers."deploy.*"]
kind = "noop"

[handlers."guarded.call"]
kind = "http"
url = "http://127.0.0.1:9/unused"
breaker = { failures = 5 }

[limits."guarded.*"]
concurrency = 2
EOF
  pport=$(free_port)
  cport=$(free_port)
  launch producer WARREN_HTTP_ADDR="127.0.0.1:$pport" WARREN_TOPOLOGY__PREFIX="$prefix" \
    "$bin/warren-producer" --config "$work/producer.toml"
  ppid=$last_pid
  launch consumer WARREN_HTTP_ADDR="127.0.0.1:$cport" WARREN_TOPOLOGY__PREFIX="$prefix" \
    "$bin/warren-consumer" --config "$work/consumer.toml"
  cpid=$last_pid

  # 3. tini as PID 1 of a PID namespace (as in a container), running the
  #    Dockerfile's ENTRYPOINT; an exec handler leaves an orphan per task.
  tini_ok=""
  if [ -f "$work/entrypoint.json" ]; then
    mapfile -t entry < <(python3 -c 'import json, sys; print(*json.load(open(sys.argv[1])), sep="\n")' "$work/entrypoint.json")
    cat >"$work/orphans.toml" <<EOF
[handlers."deploy.orphan"]
kind = "exec"
# sh exits at once; its background sleep is re-parented to PID 1
argv = ["sh", "-c", "echo started >> $work/orphans; sleep 0.3 & exit 0"]
EOF
    tport=$(free_port)
    if [ ! -x "${entry[0]}" ]; then
      fail "tini reaps the orphans of exec handlers" "${entry[0]} (the Dockerfile's ENTRYPOINT) is not installed here: apt-get install tini"
    else
      launch tini WARREN_HTTP_ADDR="127.0.0.1:$tport" WARREN_TOPOLOGY__PREFIX="$prefix-tini" \
        unshare --pid --fork --kill-child --mount-proc "${entry[@]}" "$bin/warren-consumer" --config "$work/orphans.toml"
      tini_pid=$last_pid
      tini_ok=1
    fi
  fi

  for role in producer consumer; do
    [ -n "${k8s_pid[$role]:-}" ] || continue
    check "k8s: warren-$role starts with the ConfigMap and manifest env (/readyz 200)" \
      await_ready "k8s-$role" "${k8s_pid[$role]}" "${k8s_port[$role]}"
  done

  # Descendants of the unshare process: "pid stat comm", PID 1 first.
  ns_procs() {
    ps -e -o pid=,ppid=,stat=,comm= | awk -v root="$1" '
      { pid[NR]=$1; ppid[NR]=$2; line[NR]=$1" "$3" "$4 }
      END { seen[root]=1; changed=1
            while (changed) { changed=0
              for (i in pid) if (seen[ppid[i]] && !seen[pid[i]]) { seen[pid[i]]=1; changed=1 } }
            for (i in pid) if (seen[ppid[i]]) print line[i] }'
  }
  orphans_started() { [ "$(wc -l <"$work/orphans" 2>/dev/null || echo 0)" -ge 3 ]; }
  no_live_sleep() { ! ns_procs "$tini_pid" | awk '$3 == "sleep" && $2 !~ /^Z/' | grep -q .; }
  no_zombie() { ! ns_procs "$tini_pid" | awk '$2 ~ /^Z/' | grep -q .; }
  tini_check() {
    await_ready tini "$tini_pid" "$tport" || return 1
    local init
    init=$(ps -o comm= --ppid "$tini_pid")
    [ "$init" = "$(basename "${entry[0]}")" ] || { echo "PID 1 of the namespace is '$init', not ${entry[0]}"; return 1; }
    for _ in 1 2 3; do
      env -i PATH="$PATH" WARREN_AMQP_URL="$amqp_url" WARREN_TOPOLOGY__PREFIX="$prefix-tini" \
        "$bin/warren-producer" publish deploy.orphan --payload '{}' >/dev/null || { echo "publish failed"; return 1; }
    done
    await orphans_started || { echo "the exec handler did not run 3 times within ${DEADLINE}s"; return 1; }
    await no_live_sleep || { echo "the orphaned sleeps did not exit within ${DEADLINE}s"; return 1; }
    await no_zombie || { echo "zombies left in the namespace:"; ns_procs "$tini_pid"; return 1; }
  }
  if [ -n "$tini_ok" ]; then
    check "tini (Dockerfile ENTRYPOINT) as PID 1 reaps the orphans of exec handlers" tini_check
  fi

  # 4. Scrape both roles once a task has run and the schedule has fired.
  live_ok=1
  check "producer with a schedule is ready" await_ready producer "$ppid" "$pport" || live_ok=""
  check "consumer with a noop handler is ready" await_ready consumer "$cpid" "$cport" || live_ok=""
  if [ -n "$live_ok" ]; then
    check "warren-producer publish deploy.check" env -i PATH="$PATH" WARREN_AMQP_URL="$amqp_url" \
      WARREN_TOPOLOGY__PREFIX="$prefix" "$bin/warren-producer" publish deploy.check --payload '{}'
    task_ran() {
      http_get "http://127.0.0.1:$cport/metrics" >"$work/consumer.metrics" &&
        grep -Eq '^warren_consumer_tasks_total\{.*outcome="succeeded".*\} [1-9]' "$work/consumer.metrics"
    }
    fired() {
      http_get "http://127.0.0.1:$pport/metrics" >"$work/producer.metrics" &&
        grep -q '^warren_producer_last_fire_timestamp_seconds{' "$work/producer.metrics"
    }
    check "consumer ran a task (warren_consumer_tasks_total succeeded > 0)" await task_ran
    check "producer fired its schedule (warren_producer_last_fire_timestamp_seconds)" await fired
    tally < <(python3 -c "$PY" metrics "$work")
  fi
else
  fail "live checks" "no broker and/or no binaries"
fi

echo "deploy checks: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
