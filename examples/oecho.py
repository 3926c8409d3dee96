"""oecho: the Ouroboros echo example, over a tether gateway.

    tether gateway --listen 127.0.0.1:7443 &
    python examples/oecho.py server --gateway 127.0.0.1:7443 &
    python examples/oecho.py client --gateway 127.0.0.1:7443

The server echoes one message per flow and deallocates; the client prints the reply
and then reads again: that read returns b"" at once (the server deallocated), or
raises FlowDown if the server vanished, after at most the liveness timeout. It
never hangs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import tether


async def server(args: argparse.Namespace) -> None:
    async with tether.Node(args.name or "oecho-server", gateway=args.gateway,
                           liveness=args.liveness) as node:
        node.register("oecho")
        print("ready", flush=True)
        while True:
            flow = await node.accept()
            msg = await flow.read()
            await flow.write(msg)
            if args.hold:
                continue  # keep the flow open (to test freezing and killing)
            await flow.dealloc()


async def client(args: argparse.Namespace) -> int:
    async with tether.Node(args.name or "oecho-client", gateway=args.gateway) as node:
        flow = await node.alloc("oecho", liveness=args.liveness)
        await flow.write(b"Client says hi!")
        print("reply:", (await flow.read()).decode(), flush=True)
        t0 = time.monotonic()
        try:
            rest = await flow.read()
        except tether.FlowDown as exc:
            print(f"second read: {type(exc).__name__} reason={exc.reason!r} "
                  f"code={int(exc.code)} after={time.monotonic() - t0:.3f}s", flush=True)
            return 0
        print(f"second read: {rest!r} after={time.monotonic() - t0:.3f}s", flush=True)
        await flow.dealloc()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--gateway", default="127.0.0.1:7443")
    parser.add_argument("--name", default=None)
    parser.add_argument("--liveness", type=float, default=1.0)
    parser.add_argument("--hold", action="store_true",
                        help="server: echo but do not deallocate")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, format="%(name)s: %(message)s")
    if args.role == "server":
        tether.run(server(args))
        return 0
    return tether.run(client(args))


if __name__ == "__main__":
    sys.exit(main())
