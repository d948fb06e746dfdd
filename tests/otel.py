"""Reading dcoord's metrics in tests: an SDK provider with an in-memory reader."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import dcoord
from dcoord import metrics


class Readings:
    """The data points of every dcoord instrument, read through an in-memory reader."""

    def __init__(self, provider: MeterProvider, reader: InMemoryMetricReader) -> None:
        self.provider = provider
        self.reader = reader
        self.units: dict[str, str] = {}
        self.points: dict[str, list[Any]] = {}

    def refresh(self) -> Readings:
        self.points.clear()
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                assert scope.scope.name == metrics.METER_NAME
                assert scope.scope.version == dcoord.__version__
                for metric in scope.metrics:
                    self.units[metric.name] = metric.unit or ""
                    self.points[metric.name] = list(metric.data.data_points)
        return self

    def value(self, name: str, attributes: dict[str, str] | None = None) -> float:
        """A counter's sum, a gauge's value or a histogram's count, over the points whose
        attributes include ``attributes``."""
        total = 0.0
        for point in self.refresh().points.get(name, []):
            if (attributes or {}).items() <= dict(point.attributes).items():
                total += point.count if hasattr(point, "count") else point.value
        return total

    def attributes(self, name: str) -> list[dict[str, Any]]:
        return [dict(p.attributes) for p in self.refresh().points.get(name, [])]


@contextmanager
def reading_metrics() -> Iterator[Readings]:
    """dcoord's metrics go to a fresh SDK provider for the test, then back to the default."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.configure(meter_provider=provider)
    try:
        yield Readings(provider, reader)
    finally:
        metrics.configure()
        provider.shutdown()
