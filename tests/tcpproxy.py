"""A TCP proxy on loopback that can freeze chosen connections: they stay open but stop
forwarding, as a half-open connection (a crashed host, a dropped NAT entry) does; or cut them
once the server has answered, the answer lost (a connection that breaks after the server ran
what it was sent)."""

from __future__ import annotations

import asyncio
import contextlib


class FreezingProxy:
    """``await FreezingProxy(port).start()`` listens on 127.0.0.1:<free port> and forwards to
    ``upstream_port``. ``freeze(marker)`` stops forwarding, both ways, on every connection whose
    client bytes so far contain ``marker`` (e.g. a Redis client name in CLIENT SETNAME)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: list[dict[str, object]] = []

    async def start(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self, marker: bytes) -> int:
        """On the matching connections, the server's next bytes are dropped and the client's
        side closed instead: what the client sent reached the server, the reply never comes
        back. Returns how many connections."""
        hit = [c for c in self._conns if marker in c["seen"]]  # type: ignore[operator]
        for conn in hit:
            conn["cut"] = True
        return len(hit)

    def freeze(self, marker: bytes) -> int:
        """Freeze the matching connections; returns how many."""
        hit = [c for c in self._conns if marker in c["seen"]]  # type: ignore[operator]
        for conn in hit:
            conn["frozen"] = True
        return len(hit)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        conn: dict[str, object] = {"seen": b"", "frozen": False, "cut": False}
        self._conns.append(conn)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, sniff: bool) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    if sniff and len(conn["seen"]) < 4096:  # type: ignore[arg-type]
                        conn["seen"] = conn["seen"] + data  # type: ignore[operator]
                    if conn["frozen"]:
                        continue  # Swallowed: neither side hears from the other again.
                    if conn["cut"] and not sniff:
                        break  # The server's answer, lost: the client's side closes below.
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
