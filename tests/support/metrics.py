"""Reading a Prometheus exposition (``/metrics``) as Prometheus does, with prometheus_client's
parser, instead of matching line prefixes."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str, name: str, **labels: str) -> list[float]:
    """The values of the samples called ``name`` whose labels include ``labels``."""
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]


def sample_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(samples(text, name, **labels))


def sample_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample called ``name`` with ``labels``; None when there is none.
    More than one matching is a test's mistake (labels left out): AssertionError."""
    found = samples(text, name, **labels)
    assert len(found) <= 1, f"{len(found)} samples of {name} {labels}: give every label"
    return found[0] if found else None
