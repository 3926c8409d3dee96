"""echo_hub: the source design's echo server, in tether.

One task receives opens, ten receive data and echo it, one receives closes: the
pipeline style of the Go original, on tether's hub (asyncio), or with ``--threads``
on the thread facade ``tether.sync.Hub``. Unlike the original, a client that leaves
with echoes in flight costs nothing: sending to a gone id raises FlowClosed.

    python examples/echo_hub.py --port 7000 &
    printf 'hello\\n' | socat - TCP:127.0.0.1:7000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading

import tether
from tether.hub import Hub, HubClosed
from tether.sync import Hub as ThreadHub


async def serve(args: argparse.Namespace) -> None:
    async with Hub(args.host, args.port, idle_timeout=args.idle) as hub:
        print(f"listening on {hub.port}", flush=True)

        async def opens() -> None:
            while True:
                event = await hub.recv_open()
                if args.verbose:
                    print(f"open {event.id} from {event.peer}", flush=True)

        async def data() -> None:
            while True:
                event = await hub.recv_data()
                # the client may have left meanwhile: its Closed is on its way
                with contextlib.suppress(tether.FlowClosed):
                    hub.send(event.id, event.data)

        async def closes() -> None:
            while True:
                event = await hub.recv_close()
                if args.verbose:
                    print(f"close {event.id}: {event.reason}", flush=True)

        tasks = [opens(), closes(), *(data() for _ in range(args.workers))]
        with contextlib.suppress(HubClosed):
            await asyncio.gather(*tasks)


def serve_threads(args: argparse.Namespace) -> None:
    with ThreadHub(args.host, args.port, idle_timeout=args.idle) as hub:
        print(f"listening on {hub.port}", flush=True)

        def data() -> None:
            while True:
                event = hub.recv_data()
                with contextlib.suppress(tether.FlowClosed):
                    hub.send(event.id, event.data)

        for _ in range(args.workers):
            threading.Thread(target=data, daemon=True).start()
        while True:  # this thread receives closes; opens are simply not read
            event = hub.recv_close()
            if args.verbose:
                print(f"close {event.id}: {event.reason}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7000)
    parser.add_argument("--workers", type=int, default=10, help="data receivers")
    parser.add_argument("--idle", type=float, default=None, help="idle timeout (s)")
    parser.add_argument("--threads", action="store_true", help="use tether.sync.Hub")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    try:
        if args.threads:
            serve_threads(args)
        else:
            tether.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
