"""pubsub_hub: a tiny line-protocol publish/subscribe server on tether's hub.

    SUB topic          -> OK SUB topic          (receive what is published there)
    UNSUB topic        -> OK UNSUB topic
    PUB topic message  -> OK PUB topic N        (N subscribers got "MSG topic message")

Subscribers are routed by their connection ids, kept in a dict of sets; a closed
connection leaves every topic. Fan-out uses ``hub.send_many`` (one encoding).

    python examples/pubsub_hub.py --port 7001 &
    socat - TCP:127.0.0.1:7001      # then type: SUB news / PUB news hello
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict

import tether
from tether.hub import Closed, Data, FlowsClosed, Hub
from tether.ids import FlowId


async def serve(args: argparse.Namespace) -> None:
    topics: defaultdict[str, set[FlowId]] = defaultdict(set)
    joined: defaultdict[FlowId, set[str]] = defaultdict(set)
    async with Hub(args.host, args.port, idle_timeout=args.idle) as hub:
        print(f"listening on {hub.port}", flush=True)
        async for events in hub.batches():
            for event in events:
                if isinstance(event, Closed):
                    for topic in joined.pop(event.id, ()):
                        topics[topic].discard(event.id)
                        if not topics[topic]:
                            del topics[topic]
                    continue
                if not isinstance(event, Data):
                    continue
                reply = handle(hub, topics, joined, event)
                with contextlib.suppress(tether.FlowClosed):
                    hub.send(event.id, reply)


def handle(hub: Hub, topics: defaultdict[str, set[FlowId]],
           joined: defaultdict[FlowId, set[str]], event: Data) -> bytes:
    verb, _, rest = event.data.decode("utf-8", "replace").strip().partition(" ")
    verb = verb.upper()
    if verb in ("SUB", "UNSUB") and rest and " " not in rest:
        if verb == "SUB":
            topics[rest].add(event.id)
            joined[event.id].add(rest)
        else:
            topics.get(rest, set()).discard(event.id)
            joined[event.id].discard(rest)
        return f"OK {verb} {rest}".encode()
    if verb == "PUB":
        topic, _, message = rest.partition(" ")
        if topic:
            subscribers = list(topics.get(topic, ()))
            try:
                hub.send_many(subscribers, f"MSG {topic} {message}".encode())
            except FlowsClosed as exc:  # left this very iteration: Closed follows
                subscribers = [s for s in subscribers if s not in exc.ids]
            return f"OK PUB {topic} {len(subscribers)}".encode()
    return b"ERR expected SUB topic, UNSUB topic or PUB topic message"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7001)
    parser.add_argument("--idle", type=float, default=None, help="idle timeout (s)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        tether.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
