"""Process logging: one handler on stderr, ``text`` for a person at a terminal, ``json`` (one
object per line) for a log pipeline.

Every line carries the process's *tag* (its instance id, or ``router``), so the interleaved
output of ``fdpd up`` and of ``docker compose logs`` says who wrote it. A log call that concerns
one request passes ``extra={"request_id": rid}`` (the id the router gave it, which travels in
every message), so one grep or one JSON filter follows a request across processes; structured
fields go in ``extra={"fields": {...}}`` (merged into the JSON object; appended as JSON in text).
"""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")


class _Tag(logging.Filter):
    """Stamps every record with the process tag (set again once the instance id is known)."""

    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        record.tag = self.tag
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(tag)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%H:%M:%S", time.localtime(record.created)) + \
            f".{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        fields = getattr(record, "fields", None)
        if rid is not None and rid not in record.getMessage():
            text += f" [request_id={rid}]"
        if fields:
            text += " " + json.dumps(fields, separators=(",", ":"), default=str)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "process": getattr(record, "tag", ""),
               "logger": record.name, "msg": record.getMessage()}
        rid = getattr(record, "request_id", None)
        if rid is not None:
            out["request_id"] = rid
        fields = getattr(record, "fields", None)
        if fields:
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


def configure_logging(level: str = "info", fmt: str = "text", tag: str = "fdpd") -> _Tag:
    """(Re)configure the root logger; returns the tag filter (``.tag`` can be changed later)."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {LEVELS}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    tagger = _Tag(tag)
    root = logging.getLogger()
    root.setLevel(level.upper())
    if any(not getattr(h, "_fdpd", False) for h in root.handlers):
        # Someone else (pytest, an embedding program) owns logging here: like
        # logging.basicConfig, leave their handlers alone.
        return tagger
    handler = logging.StreamHandler(sys.stderr)
    handler._fdpd = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(tagger)
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    return tagger
