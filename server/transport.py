"""uvicorn's httptools protocol with one socket write per response instead of two.

Why (issue 13): uvicorn writes a response's status line and headers in one ``transport.write`` and its
body in another; uvloop sends each at once, so every response is two ``send`` syscalls and two TCP
segments. On loopback the sender's syscall also runs the receiver's TCP path, and a profile of one
worker under ``wrk`` (py-spy, 100k items) put 29 % of the server's CPU in those two writes. Here the
writes a response makes within one event-loop iteration are joined and sent once, at the end of that
iteration (``call_soon``): the header and body of an answer (sent back to back, nothing awaited between)
leave together, and so do pipelined answers.

Everything else is the stock protocol: the wrapper delegates every other transport method, flushes before
``close`` so nothing written is lost, and flow control still acts on the real transport.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport whose ``write`` calls in one loop iteration become one write of the real transport."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol over a :class:`CoalescingTransport` (``uvicorn.run(http=...)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
