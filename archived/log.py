"""structlog setup: JSON lines on stderr for machines, readable lines on a terminal.

Job runners bind `job_id` and `state` with structlog.contextvars, so every line
about a job carries both without loggers being passed around. A module's logger is
`structlog.get_logger(component="...")`: the name is bound, so it reaches every line
(a name passed positionally goes to the print-logger factory, which drops it). In
JSON, an exception is a list of structured frames (`dict_tracebacks`).
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(*, debug: bool = False) -> None:
    renderer: structlog.types.Processor
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks
            if not sys.stderr.isatty()
            else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if debug else logging.INFO
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
