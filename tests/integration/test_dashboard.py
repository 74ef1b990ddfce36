"""deploy/grafana/tetri.json charts what the orchestrator exports: every metric name its PromQL
queries is on /metrics of a running app (after one request through fake SGLang instances), and the
observability compose profile mounts files that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml

from tests.adapter_helpers import chat_body, orchestrator_over, wait_until
from tests.fakes.harness import fakes

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "tetri.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def queried_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside label matchers and strings that
    are not functions, aggregations or keywords (ours all start with tetri_)."""
    expr = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', " ", expr)  # label matchers, strings, ranges
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {n for n in names if n.startswith("tetri_")}


def exported(metrics_text: str) -> tuple[set[str], set[str]]:
    """(names exported: of samples, and of declared families, base names of histograms) on a
    /metrics page. A labelled counter no event has touched yet is declared (# TYPE) with no sample."""
    samples = {line.split("{")[0].split(" ")[0] for line in metrics_text.splitlines()
               if line and not line.startswith("#")}
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, re.M))
    histograms = {name for name, kind in types.items() if kind == "histogram"}
    return samples | {name for name, kind in types.items() if kind != "histogram"}, histograms


def test_queried_metrics_parser():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(tetri_ttft_seconds_bucket[$__rate_interval]))) '
            '+ sum(tetri_instances{state="healthy", role=~"tetri_x"})')
    assert queried_metrics(expr) == {"tetri_ttft_seconds_bucket", "tetri_instances"}


def test_every_dashboard_metric_is_exported(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 14
    with fakes() as group:
        p, d = group.sglang("prefill"), group.sglang("decode", enable_role_switch=True)
        with orchestrator_over(tmp_path, (p, "sglang", "prefill", "toy-pd", "sg-prefill"),
                               (d, "sglang", "decode", "toy-pd", "sg-decode")) as (url, _):
            resp = httpx.post(f"{url}/v1/chat/completions", json=chat_body("toy-pd", "Hello there"), timeout=30)
            assert resp.status_code == 200, resp.text
            # A flip, so that the flip counter has a sample (a counter with labels has none before).
            flip = httpx.post(f"{url}/admin/instances/sg-decode/flip", json={"role": "prefill"}, timeout=30,
                              headers={"Authorization": "Bearer test-admin-token"})
            assert flip.status_code == 200, flip.text

            def page() -> str:
                return httpx.get(f"{url}/metrics", timeout=10).text

            wait_until(lambda: "tetri_instance_kv_used_ratio{" in page(), timeout=10)
            text = page()
    samples, histograms = exported(text)
    missing = []
    for expr in exprs:
        for name in queried_metrics(expr):
            base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
            if (base in histograms) if base else name in samples:
                continue
            missing.append(f"{name} (in {expr})")
    assert not missing, "dashboard queries metrics /metrics does not export:\n" + "\n".join(missing)
    # The new latency histograms saw the request.
    for hist in ("tetri_e2e_latency_seconds", "tetri_inter_token_latency_seconds"):
        assert hist in histograms
        count = re.search(rf"^{hist}_count (\S+)$", text, re.M)
        assert count and float(count.group(1)) >= 1


def test_dashboard_uses_the_provisioned_datasource():
    dash = json.loads(DASHBOARD.read_text())
    source = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_observability_profile_mounts_existing_files():
    for path in sorted((ROOT / "docker").glob("compose.*.yml")):
        services = yaml.safe_load(path.read_text())["services"]
        for name in ("prometheus", "grafana"):
            svc = services[name]
            assert svc["profiles"] == ["observability"], f"{path.name}: {name}"
            for vol in svc["volumes"]:
                source = vol.split(":")[0]
                if source.startswith("../"):
                    assert (path.parent / source).exists(), f"{path.name}: {name} mounts missing {source}"
        prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
        target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
        assert target.split(":")[0] in services and target.endswith(":8000")
