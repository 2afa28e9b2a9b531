"""Exceptions shared by the engine and its front ends (offline API, CLI, HTTP server).

Kept apart from the engine so that the server can name them without importing the engine's
internals, and so that there is one class per failure, whoever raises it.
"""
from __future__ import annotations


class EngineStepError(RuntimeError):
    """An iteration failed; the requests it held were aborted and their KV blocks freed.

    `request_ids` are the user requests that died (empty when the caller does not know them, e.g.
    the server failing every request after a broken iteration); `cause` is the original error.
    """

    def __init__(self, message_or_ids: str | list[str], cause: BaseException | None = None) -> None:
        if isinstance(message_or_ids, str):
            message, request_ids = message_or_ids, []
        else:
            request_ids = list(message_or_ids)
            message = f"iteration failed ({type(cause).__name__}: {cause}); aborted requests {request_ids}"
        super().__init__(message)
        self.request_ids = request_ids
        self.cause = cause
