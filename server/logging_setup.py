"""Server logs: human-readable text or JSON lines, with one line per finished request.

Data flow:
  1. `configure_logging(log_format, level)` (called by `loong-jax serve`, never on import) puts one
     handler on the `loong_jax` logger: `TextFormatter` or `JsonFormatter` (`--log-format json`).
  2. Code that wants structured fields logs with `extra={"fields": {...}}`; the JSON formatter merges
     them into the line, the text formatter appends them as key=value.
  3. `log_request_finished(...)` writes the one line per finished request (id, outcome, token counts,
     timings, peer) on the `loong_jax.server.requests` logger.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

ROOT_LOGGER = "loong_jax"
REQUEST_LOGGER = "loong_jax.server.requests"
LOG_FORMATS = ("text", "json")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return text


def configure_logging(log_format: str = "text", level: int | str = logging.INFO,
                      stream: TextIO | None = None) -> logging.Handler:
    """Routes loong_jax's logs to `stream` (stderr) in the chosen format; returns the handler."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger(ROOT_LOGGER)
    for old in list(logger.handlers):  # a second call replaces, never duplicates, the handler
        if getattr(old, "_loong_jax_handler", False):
            logger.removeHandler(old)
    handler._loong_jax_handler = True
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


def log_request_finished(*, request_id: str, outcome: str, code: str, prompt_tokens: int,
                         completion_tokens: int, queue_s: float | None, time_to_first_token_s: float | None,
                         e2e_s: float | None, peer: str | None, message: str = "") -> None:
    """The one line per finished request (outcome: stop, length, abort, cancelled, error ...)."""
    fields = {
        "event": "request_finished",
        "request_id": request_id,
        "outcome": outcome,
        "code": code,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "queue_s": None if queue_s is None else round(queue_s, 6),
        "ttft_s": None if time_to_first_token_s is None else round(time_to_first_token_s, 6),
        "e2e_s": None if e2e_s is None else round(e2e_s, 6),
        "peer": peer,
    }
    if message:
        fields["detail"] = message
    logging.getLogger(REQUEST_LOGGER).info("request %s finished: %s", request_id, outcome,
                                           extra={"fields": fields})
