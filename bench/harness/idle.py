"""Idle connections for the memory scenario: open N TCP connections to a proxy, send
one HTTP/1.1 keep-alive request on each, read the whole response, and hold them."""

from __future__ import annotations

import asyncio
import resource

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench-idle\r\n\r\n"


def raise_nofile() -> int:
    """Raises the soft descriptor limit to the hard one; returns it. Children (the
    proxies) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


async def _one(port: int, timeout: float):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    writer.write(REQUEST)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    if " 200 " not in lines[0] + " ":
        writer.close()
        raise RuntimeError(f"status line {lines[0]!r}")
    length = None
    for line in lines[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
        if line.lower().startswith("connection:") and "close" in line.lower():
            writer.close()
            raise RuntimeError("the proxy closed the connection (connection: close)")
    if length is None:
        writer.close()
        raise RuntimeError("no content-length in the response")
    await asyncio.wait_for(reader.readexactly(length), timeout)
    return reader, writer


class IdleConnections:
    """Holds connections across several `add` calls on one event loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.conns: list = []

    def add(self, port: int, n: int, batch: int = 200, timeout: float = 10.0) -> None:
        """Opens n more connections (batch at a time); raises if any fails."""
        async def run():
            left = n
            while left > 0:
                k = min(batch, left)
                results = await asyncio.gather(*(_one(port, timeout) for _ in range(k)),
                                               return_exceptions=True)
                for r in results:
                    if isinstance(r, BaseException):
                        raise RuntimeError(
                            f"idle connection {len(self.conns) + 1} of {n}: "
                            f"{type(r).__name__}: {r}") from r
                    self.conns.append(r)
                left -= k
        self.loop.run_until_complete(run())

    def still_open(self) -> int:
        """How many held connections the proxy has not closed (EOF not seen)."""
        # Let the loop take in whatever arrived (a close shows up as EOF).
        self.loop.run_until_complete(asyncio.sleep(0.05))
        return sum(1 for reader, _ in self.conns if not reader.at_eof())

    def close(self) -> None:
        async def run():
            for _, writer in self.conns:
                writer.close()
            await asyncio.gather(*(w.wait_closed() for _, w in self.conns),
                                 return_exceptions=True)
        try:
            self.loop.run_until_complete(run())
        finally:
            self.conns.clear()
            self.loop.close()
