"""uvicorn's HTTP protocol with a header deadline, and the uvicorn config of `dsv3 serve`.

uvicorn times out only idle keep-alive connections (`timeout_keep_alive`, armed after a response):
a connection that opens and never finishes its request headers is held forever, so 500 such
connections (a slowloris) took every slot. `HeaderDeadline` closes a connection that has not
sent complete request headers `header_timeout` seconds after it opened, or after the first byte
of its next request on a kept-alive connection; a request being handled is never timed out here
(a long generation, a slow upload of the body are the handlers' business).
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("dsv3.serve")


def header_deadline_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's default HTTP protocol (httptools when installed, else h11)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderDeadline(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._between_requests():
                if self._deadline is None and not self.transport.is_closing():
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._between_requests() and not self.transport.is_closing():
                log.debug("closing a connection from %s: no complete request headers within %s s",
                         self.client[0] if self.client else "?", header_timeout)
                self.transport.close()

    return HeaderDeadline


def uvicorn_config(app, log_level: str, header_timeout: float, **kw):
    """The `uvicorn.Config` of `dsv3 serve` (its protocol drops connections that stall their headers)."""
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, http=header_deadline_protocol(header_timeout),
                          timeout_graceful_shutdown=5, **kw)
