"""structlog JSON logging: request ids and numbers only, never prompt or generated text.

Every line a process writes to stderr is one JSON object: besides structlog's own lines, records of the stdlib
`logging` module (asyncio's, grpc's, any library's), event-loop errors, warnings and uncaught exceptions are
rendered the same way. Their free text is never trusted: a library message is cut before anything that may quote a
value (`log_record`, `message`), and exceptions keep only their type and frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import threading
import traceback
import warnings

import structlog

_log = structlog.get_logger("common.logs")

# where a library's message starts quoting values (reprs, formatted arguments, key: value lists); square brackets
# stay: grpc puts type names and method paths in them, and a list of strings is cut at its first quote
_QUOTING = re.compile(r"[\n(<'\"{:=%]")
_MAX_TEXT = 120


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


def safe_text(text: object) -> str:
    """The leading plain words of a library's message, up to where it may start quoting values."""
    if not isinstance(text, str):
        return type(text).__name__
    return _QUOTING.split(text, 1)[0].strip()[:_MAX_TEXT]


def _foreign_record(_logger, _method, event: dict) -> dict:
    """A stdlib record as event `log_record` with its logger's name as `source`. Its arguments are never
    interpolated: a message with arguments keeps its template (the library's own words), a preformatted one only
    its leading words (safe_text)."""
    record = event.get("_record")
    event.pop("stack_info", None)
    if event.pop("positional_args", None) and record is not None and isinstance(record.msg, str):
        event["message"] = record.msg.split("\n", 1)[0][:_MAX_TEXT]
    else:
        event["message"] = safe_text(record.msg if record is not None else event.get("event"))
    event["event"] = "log_record"
    if record is not None:
        event["source"] = record.name
    return event


def _bind_defaults(bound: dict):
    def add(_logger, _method, event: dict) -> dict:
        for key, value in bound.items():  # records from threads do not see the main thread's contextvars
            event.setdefault(key, value)
        return event

    return add


class _JSONHandler(logging.Handler):
    """Renders stdlib records through structlog and writes them with structlog's own per-file lock, so lines from
    both never interleave."""

    def __init__(self, formatter: logging.Formatter, stream) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self._out = structlog.PrintLogger(stream)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception as exc:  # logging's own handleError would print the record's arguments as plain text
            line = structlog.processors.JSONRenderer()(None, "error", {
                "event": "log_record_failed", "level": "error", "source": record.name,
                "exception": type(exc).__name__})
        with contextlib.suppress(Exception):  # stderr gone: nowhere left to report it
            self._out.msg(line)


def log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio's exception handler: what failed (task coroutine, callback, async generator) and the exception's
    type and frames; asyncio's own text quotes reprs, so only its leading words are kept."""
    fields: dict = {"message": safe_text(context.get("message") or "")}
    for key in ("task", "future"):
        obj = context.get(key)
        if isinstance(obj, asyncio.Task):
            fields["task"] = getattr(obj.get_coro(), "__qualname__", type(obj.get_coro()).__name__)
            break
    handle = context.get("handle")
    callback = getattr(handle, "_callback", None)
    if callback is not None:
        fields["callback"] = getattr(callback, "__qualname__", type(callback).__name__)
    agen = context.get("asyncgen")
    if agen is not None:
        fields["asyncgen"] = getattr(agen, "__qualname__", type(agen).__name__)
    exc = context.get("exception")
    if exc is not None:
        fields["exc_info"] = exc
    _log.error("event_loop_error", **fields)


class _LoopPolicy(asyncio.DefaultEventLoopPolicy):
    """Every new event loop (asyncio.run, new_event_loop) reports its errors through log_loop_exception."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.set_exception_handler(log_loop_exception)
        return loop


def _excepthook(exc_type, exc, tb) -> None:
    _log.error("uncaught_exception", exc_info=(exc_type, exc, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else None
    _log.error("thread_exception", thread=thread, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _unraisablehook(unraisable) -> None:
    _log.error("unraisable_exception", message=safe_text(unraisable.err_msg or "Exception ignored in"),
               object=type(unraisable.object).__name__,
               exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    _log.warning("python_warning", category=category.__name__, where=f"{filename}:{lineno}",
                 message=safe_text(str(message)))


def adopt_library_loggers() -> None:
    """Route every logger that prints by itself (a library's own stderr handler with propagation off, as
    transformers sets up when it is imported) through the root's JSON handler instead. configure_logging does this
    for the libraries imported by then; call it again once a library imported later has created its loggers."""
    for logger in list(logging.root.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue
        printers = [h for h in logger.handlers if type(h) is logging.StreamHandler
                    and h.stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)]
        for handler in printers:
            logger.removeHandler(handler)
        if printers:
            logger.propagate = True


def configure_logging(level: str = "info", **bound) -> None:
    """Send JSON lines to stderr; `bound` key/values (e.g. component, port) go on every line."""
    levelno = logging.getLevelName(level.upper())
    common = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_exception,
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, _bind_defaults(bound), *common,
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    if bound:
        structlog.contextvars.bind_contextvars(**bound)

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, _bind_defaults(bound), *common, _foreign_record],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.JSONRenderer()],
        use_get_message=False,
        pass_foreign_args=True,  # only to tell a template from a preformatted message (_foreign_record)
    )
    root = logging.getLogger()
    for handler in list(root.handlers):  # plain-text printers (an earlier basicConfig, this function's last call)
        if isinstance(handler, _JSONHandler) or (type(handler) is logging.StreamHandler
                                                 and handler.stream in (sys.stderr, sys.stdout)):
            root.removeHandler(handler)
    root.addHandler(_JSONHandler(formatter, sys.stderr))
    root.setLevel(levelno)
    adopt_library_loggers()

    warnings.showwarning = _showwarning
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisablehook
    if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:
        asyncio.set_event_loop_policy(_LoopPolicy())
    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop().set_exception_handler(log_loop_exception)
