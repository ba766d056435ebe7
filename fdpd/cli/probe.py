"""``fdpd health``: HTTP probes for container health checks, stdlib only (a probe runs every few
seconds; it must start fast and never import torch)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def _get(url: str, timeout: float, api_key: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def check_url(url: str, timeout: float) -> tuple[bool, str]:
    """Healthy iff ``url`` answers 200."""
    try:
        status, body = _get(url, timeout)
    except (OSError, ValueError) as e:
        return False, f"{url}: {e}"
    text = body.decode(errors="replace").strip()[:200]
    return status == 200, f"{url}: {status} {text}"


def check_instance(router: str, instance_id: str, api_key: str | None,
                   timeout: float) -> tuple[bool, str]:
    """Healthy iff the router's ``/v1/cluster`` lists ``instance_id`` as healthy."""
    base = router if "://" in router else f"http://{router}"
    url = base.rstrip("/") + "/v1/cluster"
    try:
        status, body = _get(url, timeout, api_key)
        if status != 200:
            return False, f"{url}: {status}"
        views = json.loads(body)["instances"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"{url}: {e}"
    view = next((v for v in views if v.get("instance_id") == instance_id), None)
    if view is None:
        return False, f"{instance_id} is not registered with the router at {base}"
    if not view.get("healthy"):
        return False, (f"{instance_id} missed its heartbeats "
                       f"({view.get('seconds_since_heartbeat')} s since the last)")
    return True, f"{instance_id} ({view.get('role')}, epoch {view.get('epoch')}) is healthy"
