"""The Prometheus alert rules (deploy/prometheus/streamchat-alerts.yml): well formed, and every metric they query is
one the real server exports at /metrics (started as in test_service, after one answer so labelled series exist), or,
for the accelerator rules, one the server's collector exports for an engine that reports its device."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import websockets
import yaml

from appliance.device_usage import DeviceUsage
from appliance.service.metrics import AcceleratorCollector
from tests.test_service import PROMPT, Server, _answer

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "streamchat-alerts.yml"
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan"}
THRESHOLDS = {"StreamChatCpuHigh": "> 0.85", "StreamChatMemoryHigh": "> 0.85", "StreamChatLatencyP99High": "> 0.5",
              "StreamChatErrorRateHigh": "> 0.01", "StreamChatTimeToFirstTokenHigh": "> 1",
              "StreamChatStreamStalls": "> 0.01", "StreamChatAcceleratorMemoryHigh": "> 0.85",
              "StreamChatAcceleratorBusy": "> 0.85", "StreamChatReplicasSaturated": "> 0.85",
              "StreamChatRepetitionHigh": "> 0.15", "StreamChatTopicConsistencyLow": "< 0.7",
              "StreamChatReplicaDown": "== 0"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: names not called as functions, with label matchers, ranges,
    grouping lists and string literals taken out first."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in NAME.finditer(expr):
        called = expr[match.end():].lstrip().startswith("(")
        in_number = match.start() > 0 and expr[match.start() - 1].isdigit()  # the "e3" of 1e3
        if match.group() not in PROMQL_WORDS and not called and not in_number:
            names.add(match.group())
    return names


def rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """The sample names of the running server's /metrics after one WebSocket answer."""
    srv = Server(tmp_path_factory.mktemp("alerts"))
    try:
        async def chat():
            async with websockets.connect(srv.ws_url) as ws:
                return await _answer(ws, {"text": PROMPT, "greedy": True, "max_new_tokens": 8})

        _, done = asyncio.run(chat())
        assert done["type"] == "done", done
        text = httpx.get(srv.url + "/metrics", timeout=10).text
    finally:
        srv.stop()
    return {NAME.match(line).group() for line in text.splitlines() if line and not line.startswith("#")}


def test_metric_names_are_read_from_promql():
    assert metric_names('sum by (instance, le) (rate(a_seconds_bucket{job="x", kind=~"a|b"}[5m])) / b_total > 0.5'
                        ) == {"a_seconds_bucket", "b_total"}
    assert metric_names("histogram_quantile(0.99, c) > 1e3 and on (instance) d") == {"c", "d"}


def test_every_rule_is_complete_with_the_issue_thresholds():
    found = {rule["alert"]: rule for rule in rules()}
    assert set(found) == set(THRESHOLDS)
    for name, rule in found.items():
        assert rule["for"] == "5m", name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["expr"].rstrip().endswith(THRESHOLDS[name]), (name, rule["expr"])


def accelerator_metrics() -> set[str]:
    """The sample names the server's accelerator collector exports for an engine reporting every field."""
    class Engine:
        def device_usage(self) -> list[DeviceUsage]:
            return [DeviceUsage("npu:0", 3 << 30, 32 << 30, 0.5)]

    class Replica:
        index, model = 0, type("Model", (), {"engine": Engine()})()

    pool = type("Pool", (), {"replicas": [Replica()]})()
    return {sample.name for family in AcceleratorCollector(pool).collect() for sample in family.samples}


def test_every_metric_a_rule_uses_is_exported_by_the_server(exported):
    assert not {n for n in exported if n.startswith("streamchat_accelerator_")}, "a CPU engine reports no device"
    device = accelerator_metrics()
    assert device == {"streamchat_accelerator_memory_used_bytes", "streamchat_accelerator_memory_total_bytes",
                      "streamchat_accelerator_utilisation_ratio"}
    used = {name: metric_names(rule["expr"]) for name, rule in ((r["alert"], r) for r in rules())}
    assert all(used.values()), used
    missing = {name: sorted(names - exported - device) for name, names in used.items() if names - exported - device}
    assert not missing, f"not at /metrics: {missing}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: apt install prometheus)")
def test_promtool_checks_the_rules():
    run = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"SUCCESS: {len(rules())} rules found" in run.stdout


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: apt install prometheus)")
def test_rules_fire_over_their_thresholds_only():
    """promtool's rule unit tests: synthetic series just over and just under each newer rule's threshold."""
    run = subprocess.run(["promtool", "test", "rules", RULES.with_name("streamchat-alerts.test.yml").name],
                         capture_output=True, text=True, timeout=60, cwd=RULES.parent)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr
