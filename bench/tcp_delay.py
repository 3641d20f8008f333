#!/usr/bin/env python3
"""A TCP proxy on 127.0.0.1 that holds every byte `--delay-ms` before passing it on, each way: a
round trip through it costs twice that, whatever the protocol (an SSH connection to a far SFTP
server, say). Bandwidth is not limited; order is kept. Loopback only.

Run in a process of its own (its CPU is not the client's):
`python bench/tcp_delay.py --port 0 --to 22022 --delay-ms 10` prints `listening <port>` once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

LOOPBACK = "127.0.0.1"


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def receive() -> None:
        while True:
            try:
                data = await reader.read(256 * 1024)
            except OSError:
                data = b""
            held.put_nowait((loop.time() + delay, data))
            if not data:
                return

    async def send() -> None:
        try:
            while True:
                due, data = await held.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except OSError:  # the peer is gone: what is held for it goes nowhere
            return

    await asyncio.gather(receive(), send())


async def _serve(port: int, target: int, delay: float) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(LOOPBACK, target)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(_pump(client_reader, server_writer, delay), _pump(server_reader, client_writer, delay))
        finally:
            for w in (client_writer, server_writer):
                w.close()

    server = await asyncio.start_server(handle, LOOPBACK, port)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="the port to listen on, on 127.0.0.1 (0: any free one)")
    p.add_argument("--to", type=int, required=True, help="the port on 127.0.0.1 to pass connections to")
    p.add_argument("--delay-ms", type=float, required=True, help="how long each byte is held, each way")
    args = p.parse_args(argv)
    try:
        asyncio.run(_serve(args.port, args.to, args.delay_ms / 1000))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
