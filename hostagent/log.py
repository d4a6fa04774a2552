"""Loggers that import `logging` only when a record could be shown: the module costs ~6 ms,
more than a reboot-path bootstrap may spend on all its imports, and at the default level
(warnings) nothing it would log is shown."""

from __future__ import annotations

import sys

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_state = {"level": WARNING, "configure": None}


def set_level(level: int, configure=None) -> None:
    """The CLI's level, and how to set `logging` up once it is first needed."""
    _state["level"], _state["configure"] = level, configure


def _logging():
    # Configure on first use even when another module (boto3, requests) imported logging first.
    if _state["configure"] is not None:
        configure, _state["configure"] = _state["configure"], None
        configure()
    import logging

    return logging


class Logger:
    """The subset of logging.Logger hostagent uses, resolved on first use."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def log(self, level: int, message: str, *args, **kwargs) -> None:
        if level < _state["level"] and "logging" not in sys.modules:
            return  # below the CLI's level and nobody set logging up: nothing would show
        _logging().getLogger(self.name).log(level, message, *args, **kwargs)

    def debug(self, message: str, *args, **kwargs) -> None:
        self.log(DEBUG, message, *args, **kwargs)

    def info(self, message: str, *args, **kwargs) -> None:
        self.log(INFO, message, *args, **kwargs)

    def warning(self, message: str, *args, **kwargs) -> None:
        self.log(WARNING, message, *args, **kwargs)

    def error(self, message: str, *args, **kwargs) -> None:
        self.log(ERROR, message, *args, **kwargs)

    def exception(self, message: str, *args, **kwargs) -> None:
        self.log(ERROR, message, *args, exc_info=True, **kwargs)


def get_logger(name: str) -> Logger:
    return Logger(name)
