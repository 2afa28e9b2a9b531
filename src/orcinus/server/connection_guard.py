"""A header deadline for uvicorn's h11 connections.

uvicorn closes a keep-alive connection that stays idle, but has no deadline for a request's
headers: a connection opened and left silent, or one that trickles a header byte every few
seconds (slowloris), is held for ever, and enough of them exhaust the server's sockets. This
protocol closes a connection whose request headers are not complete within `header_timeout_s`
of its opening, or of the first byte of its next request. (Bodies have their own deadline, in
middleware.BodyTimeout; uvicorn's limit_concurrency bounds the connections.)
"""
from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


class HeaderDeadlineH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0  # set on a subclass by guarded_protocol()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial_headers = False  # bytes of a request arrived, its headers are not complete
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm()  # a new request starts (or goes on arriving): its headers have a deadline
        super().data_received(data)
        self._partial_headers = self.conn.their_state is h11.IDLE and bool(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the headers are in

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        # A connection that sent nothing at all (a load balancer's TCP check, a browser's
        # preconnect) is routine: a line each would drown the log. Half-sent headers are not.
        logger.log(logging.INFO if self._partial_headers else logging.DEBUG,
                   "closing a connection that sent %s within %.0f s",
                   "incomplete request headers" if self._partial_headers else "nothing", self.header_timeout_s)
        self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[HeaderDeadlineH11Protocol]:
    """The protocol class to give uvicorn.Config(http=...)."""
    return type("HeaderDeadlineH11", (HeaderDeadlineH11Protocol,), {"header_timeout_s": header_timeout_s})
