"""The engine's exceptions, in one tree of their own so that every engine module can raise them.

    Exception
    ├── EngineError      a request the engine refuses or cannot run; `code` says whose fault it is
    ├── Cancelled        the request was cancelled; carries the usage until then
    └── ModelLoadError   a model file that cannot be loaded (at startup, never per request)

connection.py turns EngineError and Cancelled into the protocol's JobError frames.
"""

from __future__ import annotations

from protocol import ErrorCode, Usage

__all__ = ["Cancelled", "EngineError", "ModelLoadError"]


class EngineError(Exception):
    """A request the engine cannot run; `code` says whose fault it is, `param` which field (if one is)."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


class Cancelled(Exception):
    """The request was cancelled.

    `generated` counts the tokens the interrupted generation had made; `usage`, once the engine adds it,
    what the whole request used until then (None where that is not known).
    """

    def __init__(self, generated: int = 0, usage: Usage | None = None) -> None:
        super().__init__("cancelled")
        self.generated = generated
        self.usage = usage


class ModelLoadError(Exception):
    """A model file that cannot be loaded; the message is one line for the user."""
