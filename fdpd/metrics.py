"""A small Prometheus text-format registry: counters, gauges and histograms with labels.

No ``prometheus_client`` dependency and no module-level default registry: each process (or each
test) builds its own :class:`Registry` and passes it down. Metric objects are safe to update from
several threads (the router's event loop and its IO threads); ``render()`` produces the text
exposition format 0.0.4 that Prometheus scrapes.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Seconds: from sub-millisecond inter-token gaps on a GPU to minute-long CPU requests.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        if not _NAME.match(name):
            raise ValueError(f"metric name {name!r} is not a valid Prometheus name")
        for label in labelnames:
            if not _LABEL.match(label) or label == "le":
                raise ValueError(f"{name}: label name {label!r} is not allowed")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, object]) -> tuple[str, ...]:
        if not labels and not self.labelnames:
            return ()                           # the common, per-token case: no labels
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {list(self.labelnames)}, got "
                             f"{sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help.replace(chr(10), ' ')}",
                f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A value that only goes up. ``inc(amount, **labels)``."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease (inc by {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self._header() + [f"{self.name}{_labels_text(self.labelnames, k)} "
                                 f"{_format_value(v)}" for k, v in items]


class Gauge(Counter):
    """A value that goes up and down. ``set``, ``inc``, ``dec``."""

    kind = "gauge"

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: object) -> None:
        self.inc(-amount, **labels)

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets, with ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help, labelnames)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct finite numbers, got {bounds}")
        self.buckets = tuple(bounds)
        # Per label set: [count per bucket (+Inf last), sum].
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        if not labelnames:
            self._series[()] = ([0] * (len(bounds) + 1), [0.0])

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        slot = bisect.bisect_left(self.buckets, value)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[slot] += 1
            total[0] += value

    def count(self, **labels: object) -> int:
        series = self._series.get(self._key(labels))
        return sum(series[0]) if series else 0

    def render(self) -> list[str]:
        lines = self._header()
        with self._lock:
            items = sorted((k, (list(c), s[0])) for k, (c, s) in self._series.items())
        for key, (counts, total) in items:
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts):
                running += n
                le = f'le="{_format_value(bound)}"'
                lines.append(f"{self.name}_bucket{_labels_text(self.labelnames, key, le)} "
                             f"{running}")
            labels = _labels_text(self.labelnames, key)
            lines.append(f"{self.name}_sum{labels} {_format_value(total)}")
            lines.append(f"{self.name}_count{labels} {running}")
        return lines


class Summary(_Metric):
    """Quantiles computed elsewhere (e.g. shipped in a heartbeat), with ``_sum`` and
    ``_count``: ``set(count, total, {0.5: v, 0.99: w}, **labels)``."""

    kind = "summary"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        super().__init__(name, help, labelnames)
        for label in labelnames:
            if label == "quantile":
                raise ValueError(f"{name}: label name 'quantile' is reserved")
        self._series: dict[tuple[str, ...], tuple[float, float, dict[float, float]]] = {}

    def set(self, count: float, total: float, quantiles: dict[float, float],
            **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._series[key] = (count, total, dict(quantiles))

    def render(self) -> list[str]:
        lines = self._header()
        with self._lock:
            items = sorted(self._series.items())
        for key, (count, total, quantiles) in items:
            for q, v in sorted(quantiles.items()):
                le = f'quantile="{_format_value(q)}"'
                lines.append(f"{self.name}{_labels_text(self.labelnames, key, le)} "
                             f"{_format_value(v)}")
            labels = _labels_text(self.labelnames, key)
            lines.append(f"{self.name}_sum{labels} {_format_value(total)}")
            lines.append(f"{self.name}_count{labels} {_format_value(count)}")
        return lines


class Registry:
    """Owns a set of metrics; ``render()`` is the body of a ``/metrics`` response."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help, labelnames))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help, labelnames))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (),
                  buckets: Iterable[float] = LATENCY_BUCKETS) -> Histogram:
        return self._add(Histogram(name, help, labelnames, buckets))  # type: ignore[return-value]

    def summary(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Summary:
        return self._add(Summary(name, help, labelnames))  # type: ignore[return-value]

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n" if lines else ""
