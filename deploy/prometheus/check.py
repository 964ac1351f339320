#!/usr/bin/env python3
"""Checks of the gateway's monitoring files, run by deploy/test.sh.

  check.py dashboard FILE --rules-out OUT   the Grafana dashboard's structure; every query is
                                            written to OUT as a recording rule, for
                                            `promtool check rules` to parse
  check.py prometheus-rule                  prints deploy/k8s/monitoring/prometheusrule.yaml as
                                            alerts.yml makes it (test.sh diffs the two)
  check.py k8s FILE...                       validates the PodMonitor and PrometheusRule in
                                            FILEs (a kustomize render) against the Prometheus
                                            Operator's schemas (needs PyYAML and jsonschema)
  check.py live --gateway BIN --loadtest BIN
                                            starts Redis, two gateway nodes and Prometheus on
                                            loopback ports, runs a short load, then asks
                                            Prometheus every query of the dashboard and checks
                                            each answers; checks that every metric of the
                                            dashboard and the alerts is in a node's /metrics,
                                            that every alert rule evaluates, and that a drain
                                            and a broker outage show

Only the Python standard library, except `k8s`.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/bgw-gateway.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
PROMETHEUS_RULE = ROOT / "deploy/k8s/monitoring/prometheusrule.yaml"
SCHEMAS = ROOT / "deploy/k8s/monitoring/schemas"

# What Grafana puts in place of the dashboard's variables, for Prometheus to answer.
VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$datasource": "prometheus",
    "$instance": ".*",
    "$job": "gateway",
}
PANEL_TYPES = {"timeseries", "stat", "table", "row", "gauge", "bargauge", "text"}
# Metrics Prometheus makes itself: not in a node's /metrics.
SYNTHETIC = {"up", "ALERTS", "ALERTS_FOR_STATE"}


def fail(message):
    print(f"check.py: {message}", file=sys.stderr)
    sys.exit(1)


def substitute(expr):
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    if "$" in expr:
        fail(f"unknown variable in {expr!r}")
    return expr


def metric_names(expr):
    """The gateway and process metric names an expression reads."""
    names = set(re.findall(r"\b(bgw_[a-z0-9_]+|process_[a-z0-9_]+)\b", expr))
    names |= {n for n in SYNTHETIC if re.search(rf"(?<![\w:]){n}\s*[{{\[(]", expr)}
    return names


def panels_of(dashboard):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard):
    """(panel title, refId, expression with the variables substituted) of every target."""
    queries = []
    for panel in panels_of(dashboard):
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["refId"], substitute(target["expr"])))
    return queries


# --- dashboard ---------------------------------------------------------------------------

def check_dashboard(path, rules_out):
    dashboard = json.loads(Path(path).read_text())
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        if key not in dashboard:
            fail(f"{path}: no {key!r}")
    if dashboard.get("id") is not None:
        fail(f"{path}: 'id' must be null, so that an import creates the dashboard")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    if variables.get("datasource", {}).get("type") != "datasource":
        fail(f"{path}: no datasource variable: the dashboard would not import elsewhere")
    if variables["datasource"].get("query") != "prometheus":
        fail(f"{path}: the datasource variable must list Prometheus data sources")
    ids = set()
    cells = {}
    for panel in panels_of(dashboard):
        title = panel.get("title") or fail(f"{path}: a panel without a title")
        where = f"{path}: panel {title!r}"
        if panel.get("type") not in PANEL_TYPES:
            fail(f"{where}: type {panel.get('type')!r}")
        if panel.get("id") in ids or not isinstance(panel.get("id"), int):
            fail(f"{where}: id {panel.get('id')!r} missing or not unique")
        ids.add(panel["id"])
        grid = panel.get("gridPos") or fail(f"{where}: no gridPos")
        if grid["x"] < 0 or grid["w"] <= 0 or grid["x"] + grid["w"] > 24 or grid["h"] <= 0:
            fail(f"{where}: gridPos {grid} outside the 24 columns")
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                if (x, y) in cells:
                    fail(f"{where}: overlaps panel {cells[(x, y)]!r}")
                cells[(x, y)] = title
        if panel["type"] in ("row", "text"):
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            fail(f"{where}: datasource is not the ${{datasource}} variable")
        if not panel.get("description"):
            fail(f"{where}: no description (what the panel shows, for the operator)")
        targets = panel.get("targets") or fail(f"{where}: no targets")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or None in refs:
            fail(f"{where}: refIds {refs} missing or repeated")
        for target in targets:
            if target.get("datasource", {}).get("uid") != "${datasource}":
                fail(f"{where}: target {target['refId']}: datasource is not ${{datasource}}")
            if not target.get("expr", "").strip():
                fail(f"{where}: target {target['refId']}: no expr")
            if not metric_names(target["expr"]):
                fail(f"{where}: target {target['refId']}: reads no gateway metric")
    queries = dashboard_queries(dashboard)
    # Recording rules, one per query: `promtool check rules` parses each expression.
    lines = ["groups:", "  - name: dashboard-queries", "    rules:"]
    for i, (title, ref, expr) in enumerate(queries):
        lines.append(f"      - record: dashboard:query_{i}:{ref.lower()}")
        lines.append(f"        expr: {json.dumps(expr)}")
    Path(rules_out).write_text("\n".join(lines) + "\n")
    print(f"{path}: {len(ids)} panels, {len(queries)} queries written to {rules_out}")


# --- Kubernetes ---------------------------------------------------------------------------

def prometheus_rule():
    """deploy/k8s/monitoring/prometheusrule.yaml: alerts.yml's groups as a PrometheusRule."""
    text = ALERTS.read_text()
    groups = text[text.index("\ngroups:") + 1:]
    body = "".join(f"  {line}".rstrip() + "\n" for line in groups.splitlines())
    return (
        "# The alert rules of deploy/prometheus/alerts.yml for the Prometheus Operator.\n"
        "# Edit alerts.yml, then make this file again (deploy/test.sh fails while they differ):\n"
        "#   python3 deploy/prometheus/check.py prometheus-rule \\\n"
        "#       > deploy/k8s/monitoring/prometheusrule.yaml\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: gateway\n"
        "  labels:\n"
        "    app.kubernetes.io/name: gateway\n"
        "spec:\n" + body
    )


def strict(schema):
    """A Kubernetes structural schema that, like `kubectl --validate=strict`, refuses fields
    it does not declare."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


def check_k8s(files):
    import jsonschema
    import yaml

    schemas = {
        "PodMonitor": json.loads((SCHEMAS / "podmonitor-v1.json").read_text()),
        "PrometheusRule": json.loads((SCHEMAS / "prometheusrule-v1.json").read_text()),
    }
    alerts = yaml.safe_load(ALERTS.read_text())
    seen = []
    resources = [r for f in files for r in yaml.safe_load_all(Path(f).read_text())]
    for resource in resources:
        if not resource or resource.get("kind") not in schemas:
            continue
        kind, name = resource["kind"], resource["metadata"]["name"]
        if resource.get("apiVersion") != "monitoring.coreos.com/v1":
            fail(f"{kind} {name}: apiVersion {resource.get('apiVersion')}")
        validator = jsonschema.Draft7Validator(strict(schemas[kind]))
        errors = sorted(validator.iter_errors(resource), key=lambda e: list(e.path))
        for error in errors:
            print(f"{kind} {name}: {'.'.join(map(str, error.path))}: {error.message}",
                  file=sys.stderr)
        if errors:
            fail(f"{kind} {name} does not match the Prometheus Operator's schema")
        if kind == "PrometheusRule" and resource["spec"] != alerts:
            fail(f"{kind} {name}: its groups differ from deploy/prometheus/alerts.yml")
        if kind == "PodMonitor":
            selector = resource["spec"]["selector"]["matchLabels"]
            if selector.get("app.kubernetes.io/name") != "gateway":
                fail(f"{kind} {name}: does not select the gateway pods")
        seen.append(kind)
        print(f"{kind} {name}: valid")
    if sorted(seen) != ["PodMonitor", "PrometheusRule"]:
        fail(f"{' '.join(files)}: expected one PodMonitor and one PrometheusRule, found {seen}")


# --- live ---------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, data=None, headers=None, timeout=5):
    """(status, body) of one request; the status of an HTTP error too."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(what, condition, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            fail(f"timed out waiting for {what}")
        time.sleep(0.2)


class Processes:
    """The processes this check started, ended by pid when it ends."""

    def __init__(self, directory):
        self.directory = directory
        self.running = []

    def start(self, name, args, env=None):
        log = open(os.path.join(self.directory, f"{name}.log"), "w")
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        self.running.append((name, process))
        return process

    def log(self, name):
        return Path(self.directory, f"{name}.log").read_text(errors="replace")

    def stop_all(self):
        for name, process in reversed(self.running):
            if process.poll() is None:
                process.kill()
                process.wait()


class Prometheus:
    def __init__(self, url):
        self.url = url

    def api(self, path, **params):
        status, body = http(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            fail(f"Prometheus {path} {params}: {status} {body[:500]}")
        return answer["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def query_range(self, expr, start, end):
        return self.api("query_range", query=expr, start=start, end=end, step="1s")["result"]


def exposed_names(text):
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def check_live(gateway, loadtest, load):
    for program in ("redis-server", "prometheus"):
        if not shutil.which(program):
            fail(f"{program} is not installed")
    directory = tempfile.mkdtemp(prefix="bgw-monitoring-")
    processes = Processes(directory)
    try:
        run_live(processes, directory, gateway, loadtest, load)
    except SystemExit:
        for name, _ in processes.running:
            print(f"--- {name}.log (last lines)", file=sys.stderr)
            print("\n".join(processes.log(name).splitlines()[-20:]), file=sys.stderr)
        raise
    finally:
        processes.stop_all()
        shutil.rmtree(directory, ignore_errors=True)


def run_live(processes, directory, gateway, loadtest, load):
    redis_port = free_port()
    redis = processes.start("redis", [
        "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", directory,
    ])
    wait_for("redis", lambda: socket.create_connection(("127.0.0.1", redis_port), 1).close()
             or True)

    nodes = {}
    for name in ("gateway-1", "gateway-2"):
        client, admin = free_port(), free_port()
        process = processes.start(name, [gateway], env={
            "BGW_NODE_ID": name,
            "BGW_LISTEN": f"127.0.0.1:{client}",
            "BGW_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "BGW_REDIS_URL": f"redis://127.0.0.1:{redis_port}",
            "BGW_MAX_CONNECTIONS": str(max(1000, 2 * load.subscribers)),
            "BGW_DRAIN_DELAY": "3s",
            "BGW_DRAIN_WINDOW": "1s",
            "BGW_DRAIN_TIMEOUT": "5s",
            "BGW_LOG": "warn",
        })
        nodes[name] = {"ws": f"ws://127.0.0.1:{client}/ws", "client": client,
                       "admin": f"http://127.0.0.1:{admin}", "process": process}
    for name, node in nodes.items():
        wait_for(f"{name} ready", lambda: http(f"{node['admin']}/readyz")[0] == 200)

    prometheus_port = free_port()
    config = Path(directory, "prometheus.yml")
    targets = "\n".join(
        f"      - targets: ['{node['admin'].removeprefix('http://')}']\n"
        f"        labels: {{instance: {name}}}"
        for name, node in nodes.items()
    )
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{ALERTS}']\n"
        "scrape_configs:\n"
        "  - job_name: gateway\n"
        "    static_configs:\n"
        f"{targets}\n"
    )
    prometheus = Prometheus(f"http://127.0.0.1:{prometheus_port}")
    processes.start("prometheus", [
        "prometheus", f"--config.file={config}",
        f"--storage.tsdb.path={directory}/tsdb",
        f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn",
    ])
    wait_for("prometheus", lambda: http(f"{prometheus.url}/-/ready")[0] == 200)
    wait_for("both nodes scraped",
             lambda: len(prometheus.query('up{job="gateway"} == 1')) == 2)
    started = time.time()

    # Events the dashboard shows by reason: refused handshakes and a publish above the limit.
    gateway_1 = nodes["gateway-1"]
    status, _ = http(f"http://127.0.0.1:{gateway_1['client']}/ws", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Origin": "https://elsewhere.example",
    })
    if status != 403:
        fail(f"a handshake from another origin got {status}, not 403")
    status, _ = http(f"http://127.0.0.1:{gateway_1['client']}/ws",
                     headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    if status != 400:
        fail(f"an upgrade without a key got {status}, not 400")
    big = json.dumps({"channel": "big", "data": "x" * (1024 * 1024 + 1)}).encode()
    status, _ = http(f"{gateway_1['admin']}/v1/publish", data=big,
                     headers={"Content-Type": "application/json"})
    if status != 413:
        fail(f"a publish above the limit got {status}, not 413")

    # The load: subscribers on both nodes, publishes through both.
    run = subprocess.run([
        loadtest, "fanout", "--json",
        "--url", ",".join(n["ws"] for n in nodes.values()),
        "--admin", ",".join(n["admin"] for n in nodes.values()),
        "-s", str(load.subscribers), "-c", "4", "-r", str(load.rate), "-t", load.duration,
        "--grace", "3s",
    ], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        fail(f"loadtest failed: {run.stdout}{run.stderr}")
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"load: {json.dumps(figures)}")
    # Two scrapes after the load, so that Prometheus holds its last counts.
    last = time.time()
    wait_for("a scrape after the load", lambda: prometheus.query(
        f'timestamp(bgw_deliveries_total{{instance="gateway-2"}}) > {last + 1}'))

    # Every query of the dashboard answers, over the time of the test, as Grafana asks it.
    dashboard = json.loads(DASHBOARD.read_text())
    end = time.time()
    empty = []
    print(f"{'panel':<32} {'ref':<3} {'series':>6} {'max':>14}  query")
    for title, ref, expr in dashboard_queries(dashboard):
        result = prometheus.query_range(expr, started, end)
        values = [float(v) for series in result for _, v in series["values"]
                  if v not in ("NaN", "+Inf", "-Inf")]
        top = max(values) if values else float("nan")
        print(f"{title[:32]:<32} {ref:<3} {len(result):>6} {top:>14.6g}  {expr[:80]}")
        if not values:
            empty.append(f"{title} {ref}: {expr}")
    if empty:
        fail("queries of the dashboard without data:\n  " + "\n  ".join(empty))

    # The load shows where it should.
    def peak(expr):
        result = prometheus.query_range(expr, started, end)
        return max((float(v) for s in result for _, v in s["values"]), default=0.0)

    expectations = {
        "sum(bgw_connections)": load.subscribers,
        "sum(bgw_handshakes_total)": load.subscribers,
        "sum(bgw_subscriptions)": load.subscribers,
        "sum(bgw_deliveries_total)": figures["deliveries"],
        "sum(bgw_published_total)": figures["published"],
        'sum(bgw_handshake_rejections_total{reason="origin"})': 1,
        'sum(bgw_handshake_rejections_total{reason="bad_request"})': 1,
        'sum(bgw_limit_hits_total{limit="publish_size"})': 1,
        "min(bgw_broker_up)": 1,
        "min(process_resident_memory_bytes)": 1,
        "min(process_open_fds)": 1,
    }
    for expr, least in expectations.items():
        seen = peak(expr)
        if seen < least:
            fail(f"{expr}: at most {seen} during the test, expected at least {least}")
    print(f"expected figures seen: {', '.join(expectations)}")
    # The load's clients leave without a close handshake: not a close the server started.
    if peak('sum(bgw_closes_total{code="1002"})') > 0:
        fail("clients that left without a close frame were counted as server closes 1002")

    # Every metric the dashboard and the alerts read is one a node exposes.
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    if len(rules) < 6:
        fail(f"Prometheus loaded {len(rules)} alert rules")
    used = set()
    for _, _, expr in dashboard_queries(dashboard):
        used |= metric_names(expr)
    for rule in rules:
        used |= metric_names(rule["query"])
    _, text = http(f"{gateway_1['admin']}/metrics")
    missing = sorted(used - exposed_names(text) - SYNTHETIC)
    if missing:
        fail(f"metrics used by the dashboard or the alerts, not in /metrics: {missing}")
    print(f"{len(used)} metrics used by the dashboard and the alerts, all in /metrics")

    # Every alert rule evaluates on real series without an error.
    wait_for("every rule evaluated", lambda: all(
        r["lastEvaluation"] > "2000" for g in prometheus.api("rules")["groups"]
        for r in g["rules"]))
    broken = [(r["name"], r.get("lastError")) for g in prometheus.api("rules")["groups"]
              for r in g["rules"] if r["health"] != "ok"]
    if broken:
        fail(f"alert rules that do not evaluate: {broken}")
    firing = prometheus.query("ALERTS")
    if firing:
        fail(f"alerts on a healthy pair of nodes: {[a['metric'] for a in firing]}")
    print(f"{len(rules)} alert rules evaluate, none fires")

    # A drain shows: SIGTERM to gateway-2 (its drain delay is 3 s).
    nodes["gateway-2"]["process"].send_signal(signal.SIGTERM)
    wait_for("gateway-2 draining in Prometheus",
             lambda: prometheus.query('bgw_draining{instance="gateway-2"} == 1'), timeout=15)
    print("drain seen: bgw_draining{instance=\"gateway-2\"} == 1")

    # A broker outage shows: Redis stops, gateway-1's next scrape says so.
    redis.kill()
    redis.wait()
    wait_for("gateway-1's broker down in Prometheus",
             lambda: prometheus.query('bgw_broker_up{instance="gateway-1"} == 0'), timeout=15)
    print("broker outage seen: bgw_broker_up{instance=\"gateway-1\"} == 0")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dashboard = commands.add_parser("dashboard")
    dashboard.add_argument("file", nargs="?", default=str(DASHBOARD))
    dashboard.add_argument("--rules-out", required=True)
    commands.add_parser("prometheus-rule")
    k8s = commands.add_parser("k8s")
    k8s.add_argument("files", nargs="+")
    live = commands.add_parser("live")
    live.add_argument("--gateway", required=True)
    live.add_argument("--loadtest", required=True)
    live.add_argument("--subscribers", type=int, default=200, help="of the fan-out load")
    live.add_argument("--rate", type=int, default=50, help="publishes a second")
    live.add_argument("--duration", default="6s", help="of the publishing")
    args = parser.parse_args()
    if args.command == "dashboard":
        check_dashboard(args.file, args.rules_out)
    elif args.command == "prometheus-rule":
        sys.stdout.write(prometheus_rule())
    elif args.command == "k8s":
        check_k8s(args.files)
    else:
        check_live(args.gateway, args.loadtest, args)


if __name__ == "__main__":
    main()
