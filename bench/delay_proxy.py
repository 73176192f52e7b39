"""A TCP proxy on loopback that adds a fixed latency in each direction: the network between an RPC client and its
workers, for benchmarks on one machine (no netem kernel module here).

Every chunk read is written out `delay` seconds after it arrived, in order; bandwidth is not limited (a LAN's
latency, not its throughput, is what a decode waits for). Its own process, so that its Python does not share a
GIL with the engine it measures.

    python bench/delay_proxy.py LISTEN_PORT TARGET_HOST:TARGET_PORT DELAY_MS
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(1 << 20):
            queue.put_nowait((time.monotonic() + delay, data))
    except (ConnectionError, OSError):
        pass
    queue.put_nowait((time.monotonic() + delay, b""))
    with contextlib.suppress(ConnectionError, OSError):
        await sender


async def serve(listen_port: int, target: str, delay: float) -> None:
    host, _, port = target.rpartition(":")

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pump(client_reader, server_writer, delay), pump(server_reader, client_writer, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    print(f"proxy 127.0.0.1:{listen_port} -> {target}, {delay * 1000:g} ms each way", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]) / 1000))
