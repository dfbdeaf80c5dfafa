"""Operations: the Grafana dashboards and Prometheus alert rules name only metrics that a
running `sophon dev` exposes, the rules are well formed, the Kubernetes manifests validate
against the Kubernetes schemas, the systemd units start real subcommands, and the container
image builds where a container builder is present."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\b((?:sophon|process)_[a-z0-9_]+)")
SEVERITIES = {"critical", "warning", "info"}


def dashboard_exprs() -> dict[str, list[str]]:
    out = {}
    for path in sorted((DEPLOY / "grafana").glob("*.json")):
        d = json.loads(path.read_text())
        assert d.get("uid") and d.get("title"), path
        exprs = []
        for p in d["panels"]:
            assert p.get("targets"), f"{path.name}: panel {p.get('title')} has no query"
            exprs += [t["expr"] for t in p["targets"]]
        for v in d.get("templating", {}).get("list", []):
            if v.get("type") == "query":
                exprs.append(v["definition"])
        out[path.name] = exprs
    assert len(out) >= 2, "a node dashboard and a coordinator dashboard"
    return out


def rule_groups() -> list[dict]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "sophon-alerts.yml").read_text())
    return rules["groups"]


def exposed(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def missing(wanted: set[str], have: set[str]) -> set[str]:
    return {m for m in wanted if m not in have}


def test_every_metric_in_the_dashboards_and_rules_exists_on_a_running_sophon_dev(node):
    wanted = set()
    for exprs in dashboard_exprs().values():
        for e in exprs:
            wanted |= set(METRIC.findall(e))
    for g in rule_groups():
        for r in g["rules"]:
            wanted |= set(METRIC.findall(r["expr"]))
    assert "sophon_cluster_node_up" in wanted and "sophon_raft_term" in wanted
    # Traffic, so that the per-model series exist: good requests and a bad one.
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.5] * 784}]}
    for _ in range(20):
        r = requests.post(f"{node.base}/v2/models/mlp/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
    bad = requests.post(f"{node.base}/v2/models/mlp/infer", json={"inputs": []}, timeout=30)
    assert bad.status_code == 400, bad.text
    # The node's metrics at once; the coordinator's per-deployment gauges follow the nodes'
    # performance reports (every few seconds).
    deadline = time.monotonic() + 30
    while True:
        node_text = requests.get(f"{node.base}/metrics", timeout=10).text
        coord_text = requests.get(f"{node.admin_base}/metrics", timeout=10).text
        requests.get(f"{node.admin_base}/healthz", timeout=10)
        gone = missing(wanted, exposed(node_text) | exposed(coord_text))
        if not gone or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not gone, f"named in deploy/ but exposed by neither the node nor the coordinator: {sorted(gone)}"


def test_the_alert_rules_are_complete_and_link_their_runbooks():
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip("# ").lower()).replace(" ", "-")
        for h in operations.splitlines()
        if h.startswith("#")
    }
    alerts = [r for g in rule_groups() for r in g["rules"] if "alert" in r]
    names = {r["alert"] for r in alerts}
    for needed in ["SophonNodeDown", "SophonNoRaftLeader", "SophonDeploymentReplicasNotReady",
                   "SophonErrorRateSLO", "SophonLatencyP99SLO"]:
        assert needed in names, needed
    for r in alerts:
        assert r["labels"]["severity"] in SEVERITIES, r["alert"]
        assert r["annotations"]["summary"], r["alert"]
        url = r["annotations"]["runbook_url"]
        assert url.startswith("docs/OPERATIONS.md#"), url
        assert url.split("#", 1)[1] in anchors, f"{r['alert']}: no section {url} in docs/OPERATIONS.md"
    records = {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}
    for r in alerts:
        for used in re.findall(r"\b(sophon:[a-z0-9_:]+)", r["expr"]):
            assert used in records, f"{r['alert']} uses {used}, which no rule records"


def test_the_kubernetes_manifests_validate_against_the_kubernetes_schemas(tmp_path):
    validator = Path(sys.executable).parent / "kubernetes-validate"
    manifests = sorted(str(p) for p in (DEPLOY / "kubernetes").glob("*.yaml"))
    kinds = set()
    for m in manifests:
        kinds |= {d["kind"] for d in yaml.safe_load_all(Path(m).read_text()) if d}
    assert {"StatefulSet", "DaemonSet", "Service", "PodDisruptionBudget"} <= kinds, kinds
    out = subprocess.run([str(validator), "--strict", *manifests], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ERROR" not in out.stdout + out.stderr, out.stdout + out.stderr
    # A broken manifest is caught: the check can fail.
    broken = DEPLOY / "kubernetes" / "coordinators.yaml"
    text = broken.read_text().replace("minAvailable: 2", "minAvailabl: 2")
    tmp = tmp_path / "broken-manifest.yaml"
    tmp.write_text(text)
    bad = subprocess.run([str(validator), "--strict", str(tmp)], capture_output=True, text=True)
    assert bad.returncode != 0 and "minAvailabl" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def test_the_systemd_units_run_real_subcommands_and_flags(sophon_bin):
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        exec_start = next(
            line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith("ExecStart=")
        )
        argv = shlex.split(exec_start)
        assert argv[0] == "/usr/local/bin/sophon", unit.name
        # Every flag is parsed (an unknown one fails), then --help stops before running.
        out = subprocess.run([sophon_bin, *argv[1:], "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{unit.name}: {exec_start}\n{out.stderr}"
        bad = subprocess.run([sophon_bin, *argv[1:], "--no-such-flag", "--help"], capture_output=True,
                             text=True, timeout=30)
        assert bad.returncode != 0, unit.name


def test_the_container_image_builds_where_a_builder_is_present():
    builders = [b for b in (shutil.which("podman"), shutil.which("docker")) if b]
    # A client without its engine (docker with no daemon) cannot build.
    usable = [b for b in builders
              if subprocess.run([b, "info"], capture_output=True, timeout=60).returncode == 0]
    if not usable:
        pytest.skip(f"no working container builder (podman or docker) here: {builders or 'none installed'}")
    builder = usable[0]
    out = subprocess.run([builder, "build", "-t", "sophon:test", "-f", "Containerfile", "."], cwd=ROOT,
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    run = subprocess.run([builder, "run", "--rm", "sophon:test", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "sophon" in run.stdout, run.stdout + run.stderr
