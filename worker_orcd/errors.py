"""Error types carrying the worker's error codes.

Every failure that a user can cause (a bad file, a bad request, a prompt that does not fit) raises
one of these with a message that names the field, key or tensor at fault. `assert` is for internal
invariants only.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class: `code` is the worker's error code; `retriable`: may a retry succeed."""

    code: str = "INTERNAL"
    retriable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retriable: bool | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if retriable is not None:
            self.retriable = retriable

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ModelLoadError(WorkerError):
    """The model file cannot be used: corrupt, truncated, unsupported, or inconsistent."""

    code = "MODEL_LOAD_FAILED"


class InsufficientVramError(WorkerError):
    code = "INSUFFICIENT_VRAM"


class InvalidRequestError(WorkerError):
    """A request field is out of range, or the prompt does not fit the context."""

    code = "INVALID_REQUEST"


class ChatTemplateError(InvalidRequestError):
    """Chat mode was asked for a model without a usable chat template."""


class VramOomError(WorkerError):
    code = "VRAM_OOM"
    retriable = True
