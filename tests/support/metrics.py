"""Prometheus /metrics scraped over HTTP, and the samples tests read from it."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def scrape(port: int) -> dict[str, list]:
    """Metric family name -> its samples (name, labels, value)."""
    return {f.name: f.samples for f in text_string_to_metric_families(scrape_text(port))}


def value(families: dict[str, list], sample_name: str, **labels: str) -> float:
    """The sum of the samples named `sample_name` whose labels include `labels`."""
    return sum(s.value for samples in families.values() for s in samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def all_label_values(families: dict[str, list]) -> set[str]:
    return {v for samples in families.values() for s in samples for v in s.labels.values()}
