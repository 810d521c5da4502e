"""The pipeline's Prometheus series, scraped from the node's metrics endpoint as Prometheus would: KV use and
sessions per LLM replica, queue depth (0 when idle, not absent), state rebuilds counted only when a replica
really rebuilt a session, and the gateway's request counters."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from tests.e2e.test_sessions import greedy

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """name -> [(labels, value)] of the ray_minicpmo_* samples."""
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        m = re.match(r"^(ray_minicpmo_\w+)\{(.*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            series.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return series


def until(url: str, check, timeout_s: float = 30.0):
    """Scrape until `check(series)` is truthy (metrics reach the endpoint every second or so)."""
    deadline = time.monotonic() + timeout_s
    while True:
        series = scrape(url)
        if check(series) or time.monotonic() > deadline:
            return series
        time.sleep(0.5)  # polling the scrape endpoint


def total(series, name: str, **labels: str) -> float:
    return sum(v for lab, v in series.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_prometheus_series(served, client):
    before = scrape(served.metrics_url)
    sid = client.create_session().session_id
    client.append(sid, text="Hello there.")
    client.respond(sid, greedy(3))
    # the gauges are reported every second: a scrape right after the answer may still show its queue
    series = until(served.metrics_url, lambda s: total(s, "ray_minicpmo_kv_sessions") >= 1
                   and "ray_minicpmo_stage_queue_depth" in s
                   and total(s, "ray_minicpmo_stage_queue_depth", stage="llm") == 0)  # fmt: skip
    assert total(series, "ray_minicpmo_kv_tokens") > 0
    assert total(series, "ray_minicpmo_kv_free_tokens") > 0
    assert total(series, "ray_minicpmo_live_session_capacity") == 31  # the stack's 65536 tokens / 2048 a session
    assert "ray_minicpmo_stage_queue_depth" in series  # reported while idle too
    assert total(series, "ray_minicpmo_stage_queue_depth", stage="llm") == 0
    assert total(series, "ray_minicpmo_requests_total", rpc="Respond") >= 1
    # a new session is not a rebuild: nothing was rebuilt here
    assert total(series, "ray_minicpmo_state_rebuilds_total") == total(before, "ray_minicpmo_state_rebuilds_total")
    client.close_session(sid)
