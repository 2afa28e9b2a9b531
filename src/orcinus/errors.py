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
            # Name a request only when it is the only one: one user's error must not reveal
            # another's request id.
            request_ids = list(message_or_ids)
            if len(request_ids) == 1:  # for the caller who owns it (offline, CLI): with the cause
                message = f"request {request_ids[0]!r} failed and was aborted ({type(cause).__name__}: {cause})"
            else:
                message = f"{len(request_ids)} requests failed and were aborted ({type(cause).__name__}: {cause})"
        super().__init__(message)
        self.request_ids = request_ids
        self.cause = cause
        self.whole_batch = False  # set by the engine when every request of a batch of several failed

    def message_for(self, request_id: str) -> str:
        """The failure worded for one client: names its request only, and not the cause's text."""
        return _failed(request_id, self.cause)


def _failed(request_id: str, cause: BaseException | None) -> str:
    # The kind of failure only: a cause's text may name other requests of the batch (a device
    # error often does), and this message goes to one client. The log has the whole cause.
    return f"request {request_id!r} failed and was aborted ({type(cause).__name__}; see the server log)"
