"""One Prometheus exposition from many: every replica's series with a ``replica`` label added.

The ingress's ``/metrics`` is the merge of the replicas' latest expositions (from the
``MetricsHub``) and the ingress's own registry, so one scrape of the service sees each replica's
``quire:*`` series side by side, e.g. ``quire:prefix_cache_hits_total{replica="..."}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


def _labelled(families: Iterable[Metric], replica: str) -> Iterator[Metric]:
    for family in families:
        family.samples = [
            Sample(s.name, {**s.labels, REPLICA_LABEL: replica}, s.value, s.timestamp, s.exemplar)
            for s in family.samples
        ]
        yield family


class _MergedCollector:
    """A collector over already-parsed families, merged by name across replicas."""

    def __init__(self, expositions: Sequence[tuple[str, str]]) -> None:
        merged: dict[str, Metric] = {}
        for replica, text in expositions:
            for family in _labelled(text_string_to_metric_families(text), replica):
                known = merged.get(family.name)
                if known is None:
                    merged[family.name] = family
                else:
                    known.samples.extend(family.samples)
        self._families = list(merged.values())

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def merge_expositions(expositions: Sequence[tuple[str, str]], own: CollectorRegistry | None = None) -> bytes:
    """Prometheus text for ``(replica, exposition)`` pairs, each series labelled by its replica,
    followed by ``own`` registry's series (unlabelled)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_MergedCollector(expositions))  # type: ignore[arg-type]
    body = generate_latest(registry)
    if own is not None:
        body += generate_latest(own)
    return body
