"""structlog JSON logging: request ids and numbers only, never prompt or generated text."""

from __future__ import annotations

import logging
import sys
import traceback

import structlog


def redact_exception(_logger, _method, event: dict) -> dict:
    """Replace exc_info by the exception's type and frames: its message may quote user text, so it is dropped."""
    exc_info = event.pop("exc_info", None)
    if exc_info:
        if exc_info is True:
            exc_info = sys.exc_info()
        elif isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        if exc_info[0] is not None:
            event["exception"] = exc_info[0].__name__
            event["frames"] = [f"{f.filename}:{f.lineno}:{f.name}" for f in traceback.extract_tb(exc_info[2])]
    return event


def configure_logging(level: str = "info", **bound) -> None:
    """Send JSON lines to stderr; `bound` key/values (e.g. component, port) go on every line."""
    logging.basicConfig(stream=sys.stderr, format="%(message)s", level=level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_exception,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    if bound:
        structlog.contextvars.bind_contextvars(**bound)
