#!/usr/bin/env python3
"""Offline consistency checks of deploy/ (run by scripts/check-deploy).

    validate.py check ROOT [--promql-rules OUT]   all checks below; exit 1 on any failure
    validate.py prometheusrule ROOT                 print deploy/kubernetes/prometheusrule.yaml

Needs PyYAML and jsonschema (both in the tool venv scripts/check-deploy makes).
What is checked here (the external validators are run by scripts/check-deploy):
  - every .yml/.yaml under deploy/ parses (all documents), every .json parses;
  - compose.yaml: every ${VAR} without a default is set in .env.example, the
    KOOGATE_* variables are real settings, the Prometheus target is the koogate
    service's admin port;
  - metric names in the dashboard, alerts.yml and the PrometheusRule are
    defined in src/metrics.rs (_bucket/_sum/_count only on histograms);
  - the Grafana dashboard's structure (ids, grid, data source variable, targets);
  - Kubernetes: kustomization lists every manifest, selectors and port names
    agree, probes, security context, the grace period covers
    KOOGATE_SHUTDOWN_GRACE_SECS, ConfigMap keys are real settings, the CRD
    objects (ServiceMonitor, PrometheusRule) against small schemas;
  - prometheusrule.yaml carries exactly the groups of alerts.yml;
  - Dockerfile: builds the koogate binary with --locked, copies every target
    directory Cargo.toml declares, and the .dockerignore lets them in.
With --promql-rules, every dashboard query is written as a recording rule to
OUT so that `promtool check rules OUT` checks its PromQL syntax.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml

METRIC_RE = re.compile(r"\bkoogate_[a-z0-9_]+")
HIST_SUFFIXES = ("_bucket", "_sum", "_count")
# Variables read by koogate besides config.rs SETTINGS (log filter, --config).
EXTRA_SETTINGS = {"KOOGATE_LOG", "KOOGATE_CONFIG"}


class Checker:
    def __init__(self, root: Path):
        self.root = root
        self.deploy = root / "deploy"
        self.failures: list[str] = []
        self.passed: list[str] = []

    def fail(self, what: str) -> None:
        self.failures.append(what)

    def ok(self, what: str) -> None:
        self.passed.append(what)

    def load_yaml(self, rel: str):
        return yaml.safe_load((self.root / rel).read_text())

    # ------------------------------------------------------------------ sources of truth
    def metrics(self) -> tuple[set[str], set[str]]:
        """(all metric names, histogram names) from src/metrics.rs."""
        text = (self.root / "src/metrics.rs").read_text()
        consts = dict(re.findall(r'pub const ([A-Z_]+): &str = "([a-z0-9_]+)";', text))
        hist_consts = set(re.findall(r"histogram!\(\s*([A-Z_]+)", text))
        names = set(consts.values())
        hists = {consts[c] for c in hist_consts if c in consts}
        if not names:
            self.fail("src/metrics.rs: no `pub const NAME: &str = \"koogate_…\"` found")
        return names, hists

    def settings(self) -> set[str]:
        # The table: `settings! { NAME: Type = Component, …; … }`, one setting per entry, named KOOGATE_<NAME>.
        text = (self.root / "src/config.rs").read_text()
        block = re.search(r"^settings! \{\n(.*?)^\}", text, re.S | re.M)
        names = {"KOOGATE_" + n for n in re.findall(r"^\s+([A-Z0-9_]+):\s*[^=;]+=\s*[A-Za-z]+,", block.group(1), re.M)} if block else set()
        if not names:
            self.fail("src/config.rs: no entries found in the settings! table")
        return names

    def is_setting(self, name: str, settings: set[str]) -> bool:
        if name in settings or name in EXTRA_SETTINGS:
            return True
        return name.endswith("_FILE") and name[: -len("_FILE")] in settings

    # ------------------------------------------------------------------ parsing
    def parse_all(self) -> None:
        n = 0
        for path in sorted(self.deploy.rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(self.root)
            try:
                if path.suffix in (".yml", ".yaml"):
                    list(yaml.safe_load_all(path.read_text()))
                    n += 1
                elif path.suffix == ".json":
                    json.loads(path.read_text())
                    n += 1
            except (yaml.YAMLError, json.JSONDecodeError) as e:
                self.fail(f"{rel}: does not parse: {e}")
        self.ok(f"{n} YAML/JSON files parse")

    # ------------------------------------------------------------------ metric names
    def check_metric_refs(self, where: str, exprs: list[str], names: set[str], hists: set[str]) -> set[str]:
        used: set[str] = set()
        for expr in exprs:
            for ref in METRIC_RE.findall(expr):
                used.add(ref)
                if ref in names and ref not in hists:
                    continue
                base = next((ref[: -len(s)] for s in HIST_SUFFIXES if ref.endswith(s)), None)
                if base is not None and base in hists:
                    continue
                if ref in hists:
                    self.fail(f"{where}: {ref} is a histogram: use {ref}_bucket, _sum or _count")
                else:
                    self.fail(f"{where}: {ref} is not a metric defined in src/metrics.rs")
        if not used:
            self.fail(f"{where}: no koogate_* metric found in its expressions")
        return used

    # ------------------------------------------------------------------ dashboard
    def dashboard_exprs(self, dash: dict) -> list[tuple[str, str]]:
        """(where, expr) of every query: panel targets and query variables."""
        out: list[tuple[str, str]] = []

        def panels(ps):
            for p in ps:
                yield p
                yield from panels(p.get("panels", []))

        for p in panels(dash.get("panels", [])):
            for t in p.get("targets", []):
                if "expr" in t:
                    out.append((f"panel {p.get('id')} {p.get('title')!r} {t.get('refId')}", t["expr"]))
        for v in dash.get("templating", {}).get("list", []):
            q = v.get("query")
            if v.get("type") == "query":
                q = q.get("query") if isinstance(q, dict) else q
                out.append((f"variable {v.get('name')}", q or ""))
        return out

    def check_dashboard(self, names, hists, promql_out: Path | None) -> None:
        rel = "deploy/grafana/dashboards/koogate.json"
        dash = json.loads((self.root / rel).read_text())
        for key in ("uid", "title", "schemaVersion", "panels", "templating"):
            if key not in dash:
                self.fail(f"{rel}: no {key!r}")
        if not 36 <= int(dash.get("schemaVersion", 0)) <= 41:
            self.fail(f"{rel}: schemaVersion {dash.get('schemaVersion')} is not a Grafana 10/11 one")
        variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
        ds_var = variables.get("DS_PROMETHEUS")
        if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
            self.fail(f"{rel}: needs a datasource variable DS_PROMETHEUS of type prometheus")
        ids = set()
        for p in dash.get("panels", []):
            pid = p.get("id")
            if pid in ids:
                self.fail(f"{rel}: panel id {pid} is used twice")
            ids.add(pid)
            g = p.get("gridPos", {})
            if not all(k in g for k in "hwxy") or g["x"] + g["w"] > 24:
                self.fail(f"{rel}: panel {pid} has a bad gridPos {g}")
            if p.get("type") == "row":
                continue
            if not p.get("title"):
                self.fail(f"{rel}: panel {pid} has no title")
            targets = p.get("targets", [])
            if not targets:
                self.fail(f"{rel}: panel {pid} {p.get('title')!r} has no query")
            refids = [t.get("refId") for t in targets]
            if len(set(refids)) != len(refids) or None in refids:
                self.fail(f"{rel}: panel {pid} has missing or duplicate refIds")
            for obj in [p] + targets:
                ds = obj.get("datasource", {})
                if ds.get("uid") != "${DS_PROMETHEUS}" or ds.get("type") != "prometheus":
                    self.fail(f"{rel}: panel {pid}: datasource must be {{type: prometheus, uid: ${{DS_PROMETHEUS}}}}")
            for t in targets:
                if not t.get("expr", "").strip():
                    self.fail(f"{rel}: panel {pid} target {t.get('refId')} has no expr")
        exprs = self.dashboard_exprs(dash)
        used = self.check_metric_refs(rel, [e for _, e in exprs], names, hists)
        # Grafana variables are not PromQL: substitute them for promtool.
        if promql_out is not None:
            rules = []
            for i, (where, expr) in enumerate(exprs):
                if expr.startswith("label_values("):
                    m = re.match(r"label_values\(\s*([^,)]+)", expr)
                    expr = m.group(1) if m else expr
                expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
                expr = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)
                rules.append({"record": f"dashboard:query_{i}", "expr": expr, "labels": {"where": where[:60]}})
            promql_out.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, width=1000))
        self.ok(f"dashboard: {len(exprs)} queries, {len(used)} metric names, all in src/metrics.rs")

    # ------------------------------------------------------------------ alerts
    def alert_rules(self) -> list[dict]:
        doc = self.load_yaml("deploy/prometheus/alerts.yml")
        return [r for g in doc["groups"] for r in g["rules"]]

    def check_alerts(self, names, hists) -> None:
        rel = "deploy/prometheus/alerts.yml"
        rules = self.alert_rules()
        seen = set()
        for r in rules:
            a = r.get("alert", "?")
            if a in seen:
                self.fail(f"{rel}: alert {a} is defined twice")
            seen.add(a)
            if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                self.fail(f"{rel}: {a} needs a severity label (critical, warning or info)")
            ann = r.get("annotations", {})
            for key in ("summary", "description", "runbook_url"):
                if not ann.get(key):
                    self.fail(f"{rel}: {a} has no {key} annotation")
            if not ann.get("runbook_url", "").startswith(RUNBOOK_BASE + "#"):
                self.fail(f"{rel}: {a}: runbook_url must be absolute: {RUNBOOK_BASE}#<alert, lowercase>")
            anchor = ann.get("runbook_url", "").partition("#")[2]
            readme = (self.deploy / "README.md").read_text() if (self.deploy / "README.md").exists() else ""
            if anchor and f"### {a}" not in readme:
                self.fail(f"{rel}: {a}: deploy/README.md has no '### {a}' runbook section")
        used = self.check_metric_refs(rel, [r["expr"] for r in rules], names, hists)
        self.ok(f"alerts: {len(rules)} rules, {len(used)} metric names, all in src/metrics.rs")

    def prometheusrule(self) -> dict:
        groups = self.load_yaml("deploy/prometheus/alerts.yml")["groups"]
        return {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "koogate", "labels": {"app.kubernetes.io/name": "koogate"}},
            "spec": {"groups": groups},
        }

    def check_prometheusrule(self) -> None:
        rel = "deploy/kubernetes/prometheusrule.yaml"
        have = self.load_yaml(rel)
        if have != self.prometheusrule():
            self.fail(
                f"{rel}: differs from deploy/prometheus/alerts.yml; regenerate it with "
                f"`deploy/tools/validate.py prometheusrule . > {rel}` (scripts/check-deploy --fix does)"
            )
        else:
            self.ok("prometheusrule.yaml carries exactly the groups of alerts.yml")

    # ------------------------------------------------------------------ compose
    def check_compose(self, settings: set[str]) -> None:
        rel = "deploy/compose.yaml"
        text = (self.root / rel).read_text()
        env = {}
        for line in (self.deploy / ".env.example").read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                k, _, v = line.partition("=")
                env[k.strip()] = v.strip()
        for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+])?([^}]*)\}", text):
            var, op = m.group(1), m.group(2) or ""
            if op in ("", "?", ":?") and not env.get(var):
                self.fail(f"{rel}: ${{{var}}} has no default and is not set in deploy/.env.example")
        for var in env:
            if var not in text:
                self.fail(f"deploy/.env.example: {var} is not used by {rel}")
        doc = yaml.safe_load(text)
        services = doc.get("services", {})
        for name in ("koogate", "redis", "sink", "prometheus", "grafana"):
            if name not in services:
                self.fail(f"{rel}: no service {name!r}")
        for name, svc in services.items():
            environment = svc.get("environment", {})
            if isinstance(environment, list):
                environment = dict(e.split("=", 1) for e in environment)
            for var in environment:
                if var.startswith("KOOGATE_") and not self.is_setting(var, settings):
                    self.fail(f"{rel}: service {name}: {var} is not a koogate setting (src/config.rs)")
        for name, svc in services.items():
            image = str(svc.get("image", ""))
            if image and not image.startswith("${KOOGATE_IMAGE") and not DIGEST.match(image):
                self.fail(f"{rel}: service {name}: image {image} is not pinned by digest (@sha256:…)")
        kg = services.get("koogate", {}).get("environment", {})
        admin_port = str(kg.get("KOOGATE_ADMIN_LISTEN", "")).rpartition(":")[2]
        prom = self.load_yaml("deploy/prometheus/prometheus.yml")
        targets = [t for sc in prom.get("scrape_configs", []) if sc.get("job_name") == "koogate"
                   for st in sc.get("static_configs", []) for t in st.get("targets", [])]
        if targets != [f"koogate:{admin_port}"]:
            self.fail(f"deploy/prometheus/prometheus.yml: job koogate must scrape koogate:{admin_port}, not {targets}")
        for rf in prom.get("rule_files", []):
            if not (self.deploy / "prometheus" / rf).exists():
                self.fail(f"deploy/prometheus/prometheus.yml: rule file {rf} is not next to it")
        if ".env" not in (self.deploy / ".gitignore").read_text().split():
            self.fail("deploy/.gitignore must ignore .env (real secrets)")
        self.ok("compose: variables, settings and the Prometheus target agree")

    # ------------------------------------------------------------------ kubernetes
    def check_kubernetes(self, settings: set[str]) -> None:
        kdir = self.deploy / "kubernetes"
        kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
        listed = kust.get("resources", [])
        for r in listed:
            if not (kdir / r).exists():
                self.fail(f"deploy/kubernetes/kustomization.yaml: {r} does not exist")
        for f in sorted(kdir.glob("*.yaml")):
            if f.name not in listed and f.name not in ("kustomization.yaml", "secret.example.yaml"):
                self.fail(f"deploy/kubernetes/{f.name} is not listed in kustomization.yaml")
        if "secret.example.yaml" in listed:
            self.fail("deploy/kubernetes/kustomization.yaml must not apply secret.example.yaml")

        objs: dict[str, dict] = {}
        for f in listed:
            for d in yaml.safe_load_all((kdir / f).read_text()):
                if d:
                    objs[d["kind"]] = d
        dep = objs.get("Deployment")
        svc = objs.get("Service")
        cm = objs.get("ConfigMap")
        if not (dep and svc and cm):
            self.fail("deploy/kubernetes: needs a Deployment, a Service and a ConfigMap")
            return
        rel = "deploy/kubernetes/deployment.yaml"
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        pod_labels = spec["template"]["metadata"]["labels"]
        c = next(x for x in pod["containers"] if x["name"] == "koogate")

        def selects(sel: dict, what: str) -> None:
            if not sel or any(pod_labels.get(k) != v for k, v in sel.items()):
                self.fail(f"deploy/kubernetes: {what} selector {sel} does not select the koogate pods")

        selects(spec["selector"]["matchLabels"], "Deployment")
        selects(svc["spec"]["selector"], "Service")
        if "PodDisruptionBudget" in objs:
            selects(objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], "PodDisruptionBudget")
        if spec.get("replicas", 1) < 2:
            self.fail(f"{rel}: run 2 or more replicas")

        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if ports != {"http": 8080, "admin": 9090}:
            self.fail(f"{rel}: container ports must be http 8080 and admin 9090, not {ports}")
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ports:
                self.fail(f"deploy/kubernetes/service.yaml: targetPort {p.get('targetPort')} is not a container port name")
        svc_ports = {p["name"] for p in svc["spec"]["ports"]}
        sm = objs.get("ServiceMonitor")
        if sm:
            selects(sm["spec"]["selector"]["matchLabels"], "ServiceMonitor")
            for ep in sm["spec"]["endpoints"]:
                if ep.get("port") not in svc_ports or ep.get("path", "/metrics") != "/metrics":
                    self.fail("deploy/kubernetes/servicemonitor.yaml: endpoint must be port admin, path /metrics")

        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            hg = c.get(probe, {}).get("httpGet", {})
            if hg.get("path") != path or hg.get("port") not in ("http", 8080):
                self.fail(f"{rel}: {probe} must GET {path} on port http")
        psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
        if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
            self.fail(f"{rel}: runAsNonRoot must be true")
        if not csc.get("readOnlyRootFilesystem"):
            self.fail(f"{rel}: readOnlyRootFilesystem must be true")
        if csc.get("capabilities", {}).get("drop") != ["ALL"] or csc.get("allowPrivilegeEscalation") is not False:
            self.fail(f"{rel}: drop ALL capabilities and forbid privilege escalation")
        res = c.get("resources", {})
        if not (res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory")):
            self.fail(f"{rel}: set memory requests and limits")
        elif res["requests"]["memory"] != res["limits"]["memory"]:
            self.fail(f"{rel}: memory request must equal the limit (the scheduler reserves what the pod may use)")
        np = objs.get("NetworkPolicy")
        if not np:
            self.fail("deploy/kubernetes: needs a NetworkPolicy keeping port admin inside the namespace")
        else:
            selects(np["spec"]["podSelector"]["matchLabels"], "NetworkPolicy")
            for rule in np["spec"].get("ingress", []):
                admin = any(p.get("port") in ("admin", 9090) for p in rule.get("ports", []))
                if admin and any("namespaceSelector" in f or "ipBlock" in f for f in rule.get("from", [{}])):
                    self.fail("deploy/kubernetes/networkpolicy.yaml: port admin must be reachable only from this namespace")
                if admin and not rule.get("from"):
                    self.fail("deploy/kubernetes/networkpolicy.yaml: port admin is open to everyone")

        data = cm.get("data", {})
        grace = int(data.get("KOOGATE_SHUTDOWN_GRACE_SECS", 10))
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        if tgps <= grace + pre_stop:
            self.fail(f"{rel}: terminationGracePeriodSeconds {tgps} must exceed "
                      f"KOOGATE_SHUTDOWN_GRACE_SECS {grace} + preStop sleep {pre_stop}")
        for key in data:
            if not self.is_setting(key, settings):
                self.fail(f"deploy/kubernetes/configmap.yaml: {key} is not a koogate setting (src/config.rs)")
        if str(data.get("KOOGATE_ADMIN_LISTEN", "")).startswith("127."):
            self.fail("deploy/kubernetes/configmap.yaml: KOOGATE_ADMIN_LISTEN must not be loopback (scrapes)")
        secret_names = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        for e in c.get("env", []):
            if not self.is_setting(e["name"], settings):
                self.fail(f"{rel}: env {e['name']} is not a koogate setting (src/config.rs)")
            if e["name"].endswith("_FILE"):
                if not any(e.get("value", "").startswith(mounts.get(s, "//") + "/") for s in secret_names):
                    self.fail(f"{rel}: {e['name']} does not point into the mounted Secret")
        secret_example = yaml.safe_load((kdir / "secret.example.yaml").read_text())
        keys = set(secret_example.get("stringData", {}))
        for e in c.get("env", []):
            if e["name"].endswith("_FILE"):
                k = e["value"].rsplit("/", 1)[1]
                if k not in keys:
                    self.fail(f"deploy/kubernetes/secret.example.yaml: no key {k} (read by {e['name']})")
        self.ok("kubernetes: kustomization, selectors, ports, probes, security context, grace period, settings")

        for kind, schema in CRD_SCHEMAS.items():
            if kind in objs:
                try:
                    jsonschema.validate(objs[kind], schema)
                except jsonschema.ValidationError as e:
                    self.fail(f"deploy/kubernetes: {kind}: {e.message} at {list(e.absolute_path)}")
        self.ok("kubernetes: ServiceMonitor and PrometheusRule match their (reduced) CRD schemas")

    # ------------------------------------------------------------------ Dockerfile
    def check_dockerfile(self) -> None:
        rel = "deploy/Dockerfile"
        text = (self.root / rel).read_text()
        if not re.search(r"cargo build --release --locked --bin koogate", text):
            self.fail(f"{rel}: must run `cargo build --release --locked --bin koogate`")
        cargo = (self.root / "Cargo.toml").read_text()
        dirs = {p.split("/")[0] for p in re.findall(r'^path\s*=\s*"([^"]+)"', cargo, re.M)} | {"src"}
        ignore = (self.deploy / "Dockerfile.dockerignore").read_text().split()
        for d in sorted(dirs):
            if not re.search(rf"^COPY {re.escape(d)} \./{re.escape(d)}$", text, re.M):
                self.fail(f"{rel}: Cargo.toml has a target under {d}/ but the Dockerfile does not COPY {d}")
            if f"!{d}" not in ignore and f"!{d}/" not in ignore:
                self.fail(f"deploy/Dockerfile.dockerignore: {d}/ is not let into the build context")
        for var, want in (("KOOGATE_LISTEN", "0.0.0.0:8080"), ("KOOGATE_ADMIN_LISTEN", "0.0.0.0:9090"),
                          ("KOOGATE_STORE", "/data")):
            if not re.search(rf"\b{var}={re.escape(want)}\b", text):
                self.fail(f"{rel}: ENV {var}={want} missing")
        for name, image in re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, re.M):
            if not DIGEST.match(image):
                self.fail(f"{rel}: ARG {name}={image} is not pinned by digest (@sha256:…)")
        if not re.search(r"^USER (65532|nonroot)", text, re.M):
            self.fail(f"{rel}: the runtime must run as a non-root USER")
        self.ok("Dockerfile: --locked koogate build, every Cargo target directory copied, runtime ENV and USER")


# Where deploy/README.md is published: alert annotations link to its runbook sections. Replace it
# (alerts.yml, alerts_test.yml, here) with the address of your copy; `scripts/check-deploy --fix` then
# regenerates prometheusrule.yaml.
RUNBOOK_BASE = "https://koogate.example.com/deploy/README.md"

# Images must be pinned by digest: name[:tag]@sha256:<64 hex>.
DIGEST = re.compile(r"^[\w./:-]+@sha256:[0-9a-f]{64}$")

_STR = {"type": "string", "minLength": 1}
_META = {"type": "object", "required": ["name"], "properties": {"name": _STR}}
CRD_SCHEMAS = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "endpoints"],
                "properties": {
                    "jobLabel": _STR,
                    "namespaceSelector": {"type": "object"},
                    "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": _STR,
                                "path": _STR,
                                "scheme": {"enum": ["http", "https"]},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": _STR,
                                "interval": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["expr"],
                                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                        "properties": {
                                            "alert": _STR,
                                            "record": _STR,
                                            "expr": _STR,
                                            "for": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h|d)$"},
                                            "keep_firing_for": {"type": "string"},
                                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def _literal_representer(dumper, data):
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


def dump_prometheusrule(checker: Checker) -> str:
    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(str, _literal_representer)
    body = yaml.dump(checker.prometheusrule(), Dumper=Dumper, sort_keys=False, width=120, allow_unicode=True)
    return (
        "# GENERATED from deploy/prometheus/alerts.yml - do not edit by hand.\n"
        "# Regenerate: scripts/check-deploy --fix  (checked by scripts/check-deploy)\n"
        "# Needs the Prometheus Operator CRDs (monitoring.coreos.com/v1).\n" + body
    )


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] not in ("check", "prometheusrule"):
        print(__doc__, file=sys.stderr)
        return 2
    checker = Checker(Path(argv[2]).resolve())
    if argv[1] == "prometheusrule":
        sys.stdout.write(dump_prometheusrule(checker))
        return 0
    promql_out = Path(argv[argv.index("--promql-rules") + 1]) if "--promql-rules" in argv else None
    steps = [
        ("parse", checker.parse_all),
        ("compose", lambda: checker.check_compose(checker.settings())),
        ("dashboard", lambda: checker.check_dashboard(*checker.metrics(), promql_out)),
        ("alerts", lambda: checker.check_alerts(*checker.metrics())),
        ("prometheusrule", checker.check_prometheusrule),
        ("kubernetes", lambda: checker.check_kubernetes(checker.settings())),
        ("dockerfile", checker.check_dockerfile),
    ]
    for name, step in steps:
        failed_before, passed_before = len(checker.failures), len(checker.passed)
        try:
            step()
        except Exception as e:  # a broken file must be reported, not stop the other checks
            checker.fail(f"{name}: {type(e).__name__}: {e}")
        new_failures = checker.failures[failed_before:]
        if new_failures:
            for f in new_failures:
                print(f"  FAIL  {f}")
        else:
            for p in checker.passed[passed_before:]:
                print(f"  ok    {p}")
    return 1 if checker.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
