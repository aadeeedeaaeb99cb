"""The node's log lines: text or JSON (`--log-format json`), each naming the trace and span of the request it
was written for, at a level an operator changes while the node runs (SIGUSR1: more verbose, SIGUSR2: less).

The ids come from the OpenTelemetry context current where the line is written, so they are there only when
tracing is on (meshnode.observability.tracing) and the line belongs to a request.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TextIO

from opentelemetry.trace import get_current_span

__all__ = ["FORMATS", "configure", "less_verbose", "more_verbose"]

FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(trace)s"
# From the most to the least verbose: the steps SIGUSR1 and SIGUSR2 move the root logger's level along.
_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)


class _TraceIds(logging.Filter):
    """Adds `trace_id` and `span_id` (W3C hex, '' outside a traced request) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = get_current_span().get_span_context()
        trace_id = format(context.trace_id, "032x") if context.is_valid else ""
        span_id = format(context.span_id, "016x") if context.is_valid else ""
        record.__dict__.update(trace_id=trace_id, span_id=span_id,
                               trace=f" trace_id={trace_id} span_id={span_id}" if trace_id else "")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace ids, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": self.formatTime(record), "level": record.levelname, "logger": record.name,
            "message": record.getMessage(),
        }
        if record.__dict__.get("trace_id"):
            line["trace_id"] = record.__dict__["trace_id"]
            line["span_id"] = record.__dict__["span_id"]
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(log_format: str, level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Send every log line to `stream` (stderr) in `log_format`; returns the handler installed."""
    if log_format not in FORMATS:
        raise ValueError(f"unknown log format {log_format!r}: choose one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_TraceIds())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def more_verbose() -> int:
    """One step down (INFO -> DEBUG); returns the level now in force."""
    return _step(-1)


def less_verbose() -> int:
    """One step up (INFO -> WARNING); returns the level now in force."""
    return _step(+1)


def _step(direction: int) -> int:
    root = logging.getLogger()
    current = min(range(len(_LEVELS)), key=lambda i: abs(_LEVELS[i] - root.getEffectiveLevel()))
    level = _LEVELS[max(0, min(len(_LEVELS) - 1, current + direction))]
    root.setLevel(level)
    # Said at a level still shown, so the change itself is never lost.
    logging.getLogger(__name__).log(max(level, logging.INFO), "log level now %s", logging.getLevelName(level))
    return level
