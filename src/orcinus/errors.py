"""Exceptions shared by the engine and its front ends (offline API, CLI, HTTP server).

The bottom layer (see docs/design.md, "Layers"): it imports nothing of orcinus, so any module may
name a failure without importing the module that raises it (the CLI and the server map these to
one `error:` line or an HTTP status). The modules that raise them re-export them under their old
names.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot work; the message says what to change."""


class SamplingParamsError(ValueError):
    """A sampling parameter out of range; the message names the parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestRejected(ValueError):
    """A request that can never run (too long for the cache or the model); says why."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(FileNotFoundError):
    """No checkpoint folder or GGUF file where the model was looked for."""


class TokenizerNotFound(FileNotFoundError):
    """No tokenizer at the given path; the message says what was looked for."""


class WorkerDied(RuntimeError):
    """A worker process exited or failed beyond recovery; the executor cannot run batches."""


class EngineUnavailable(RuntimeError):
    """The engine loop is not running (dead, stopped or shutting down): answer 503."""


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: answer 503 at once rather than let requests pile up."""


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
