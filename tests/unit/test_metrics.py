"""``fdpd.metrics``: the Prometheus text the registry renders."""

from __future__ import annotations

import pytest

from fdpd.metrics import Registry


def test_render_counter_gauge_histogram():
    r = Registry()
    c = r.counter("fdpd:requests_total", "Requests.", ("endpoint", "status"))
    g = r.gauge("fdpd:running", "Running.")
    h = r.histogram("fdpd:latency_seconds", "Latency.", buckets=(0.1, 1.0))
    c.inc(endpoint="/v1/x", status="200")
    c.inc(2, endpoint='we"ird\\\n', status="500")
    g.inc(3)
    g.dec()
    for v in (0.05, 0.1, 0.5, 7.0):
        h.observe(v)
    assert r.render().splitlines() == [
        "# HELP fdpd:requests_total Requests.",
        "# TYPE fdpd:requests_total counter",
        'fdpd:requests_total{endpoint="/v1/x",status="200"} 1.0',
        'fdpd:requests_total{endpoint="we\\"ird\\\\\\n",status="500"} 2.0',
        "# HELP fdpd:running Running.",
        "# TYPE fdpd:running gauge",
        "fdpd:running 2.0",
        "# HELP fdpd:latency_seconds Latency.",
        "# TYPE fdpd:latency_seconds histogram",
        'fdpd:latency_seconds_bucket{le="0.1"} 2',
        'fdpd:latency_seconds_bucket{le="1.0"} 3',
        'fdpd:latency_seconds_bucket{le="+Inf"} 4',
        "fdpd:latency_seconds_sum 7.65",
        "fdpd:latency_seconds_count 4",
    ]
    assert c.value(endpoint="/v1/x", status="200") == 1.0 and h.count() == 4


def test_misuse_is_an_error():
    r = Registry()
    c = r.counter("x_total", "X.", ("a",))
    with pytest.raises(ValueError, match="expected labels"):
        c.inc(b="1")
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(-1, a="1")
    with pytest.raises(ValueError, match="already registered"):
        r.counter("x_total", "again")
    with pytest.raises(ValueError, match="not a valid"):
        r.gauge("bad name", "X.")
    with pytest.raises(ValueError, match="label name"):
        r.histogram("h", "H.", ("le",))
