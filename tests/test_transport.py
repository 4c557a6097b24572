"""The server's coalescing transport: a response's header and body writes leave in one socket write, and
nothing written is lost or reordered when the connection closes."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mfli.server.transport import CoalescingTransport


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport


def test_writes_in_one_iteration_become_one_send_and_close_flushes():
    async def main() -> tuple[list[bytes], bytes]:
        loop = asyncio.get_running_loop()
        left, right = socket.socketpair()
        transport, _ = await loop.create_connection(_Recorder, sock=left)
        sent: list[bytes] = []
        real_write = transport.write
        transport.write = lambda data: (sent.append(bytes(data)), real_write(data))[1]  # count real writes
        wrapped = CoalescingTransport(transport, loop)
        wrapped.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n")
        wrapped.write(b'{"items": []}')
        assert sent == []  # nothing goes out before the loop iteration ends
        await asyncio.sleep(0)
        assert len(sent) == 1
        wrapped.write(b"tail")
        wrapped.close()  # flushes what is pending, then closes
        right.setblocking(False)
        received = b""
        for _ in range(50):
            await asyncio.sleep(0.01)
            try:
                chunk = right.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            received += chunk
        right.close()
        return sent, received

    sent, received = asyncio.run(main())
    assert sent[0] == b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{"items": []}'
    assert received == sent[0] + b"tail"
    assert len(sent) == 2


def test_other_transport_methods_are_the_real_transports():
    class Fake:
        def get_extra_info(self, name, default=None):
            return ("127.0.0.1", 1) if name == "peername" else default

        def is_closing(self) -> bool:
            return False

    loop = asyncio.new_event_loop()
    try:
        wrapped = CoalescingTransport(Fake(), loop)  # type: ignore[arg-type]
        assert wrapped.get_extra_info("peername") == ("127.0.0.1", 1)
        with pytest.raises(AttributeError):
            wrapped.no_such_method  # noqa: B018
    finally:
        loop.close()
