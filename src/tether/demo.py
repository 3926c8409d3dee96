"""A tour of tether's sans-IO core: two `Link`s talking in memory, time driven by hand.

Run it with ``python -m tether.demo`` (or ``make run``). Nothing here touches a socket or
reads the clock. A CLIENT and a SERVER `tether.link.Link` are wired back to back by
`Demo.transfer`, which moves each link's `data_to_send()` into the other's
`receive_data()`; the virtual clock `now` only moves when the demo sets it to the links'
`next_deadline()` and calls `handle_timer()`. It prints every frame that crosses (decoded
by a separate `wire.FrameDecoder` per direction, only to print it), every event and every
change of a flow's state. The server runs an "oecho" echo app; the client is scripted.

What it shows:

1. the HELLO handshake, one HELLO each way;
2. a flow to "oecho": OPEN, OPEN_OK, "Client says hi!" and its echo, the client's FIN
   (half-close), the server's CLOSE (dealloc), and one `FlowEnded` on each side;
3. a flow whose peer goes silent: the server's bytes stop reaching the client, which
   keeps sending KEEPALIVEs and, after its 1 s liveness timeout, takes the flow DOWN
   ("unresponsive peer") and tells the server with a RESET: no reader hangs forever.
"""

from __future__ import annotations

import dataclasses
from enum import Enum

from . import wire
from .errors import ErrorCode
from .events import DataReceived, Event, FinReceived, FlowEnded, FlowOpenRequested
from .flowstate import FlowState
from .link import Link, LinkConfig, Role

__all__ = ["Demo", "describe", "main"]

LIVENESS = 1.0  # seconds of silence after which a flow goes DOWN


def describe(item: wire.Frame | Event) -> str:
    """A frame or an event as one line: its name, then its fields that differ from their
    default, enums and error codes by name."""
    parts = [wire.frame_name(item.TYPE) if isinstance(item, wire.Frame) else type(item).__name__]
    if dataclasses.is_dataclass(item):
        for field in dataclasses.fields(item):
            value = getattr(item, field.name)
            if value != field.default:
                value = ErrorCode(value) if field.name == "code" else value
                if isinstance(value, memoryview):  # a payload as the link decoded it
                    value = value.tobytes()
                shown = value.name if isinstance(value, Enum) else repr(value)
                parts.append(f"{field.name}={shown}")
    return " ".join(parts)


class Demo:
    """A CLIENT and a SERVER link back to back, a virtual clock, and a printer."""

    def __init__(self) -> None:
        self.now = 0.0
        self.links = {"client": Link(Role.CLIENT, LinkConfig(name="client"), self.now),
                      "server": Link(Role.SERVER, LinkConfig(name="server"), self.now)}
        self.decoders = {side: wire.FrameDecoder() for side in self.links}  # by sender
        self.states: dict[tuple[str, int], FlowState] = {}
        self.blackhole = False  # True: the server's bytes no longer reach the client

    def say(self, text: str) -> None:
        print(f"[t={self.now:.3f}] {text}")

    def transfer(self) -> None:
        """Move bytes both ways, printing frames and events, until both links are quiet."""
        self.update()
        moved = True
        while moved:
            moved = False
            for src, dst in (("client", "server"), ("server", "client")):
                data = self.links[src].data_to_send()
                if data:
                    moved = True
                    lost = self.blackhole and src == "server"
                    for frame in self.decoders[src].feed(data):
                        self.say(f"{src} -> {dst}  {describe(frame)}" + ("   (lost)" * lost))
                    if not lost:
                        self.links[dst].receive_data(data, self.now)
                self.update()

    def run_timers(self) -> None:
        """Jump the clock from deadline to deadline, firing timers, until the client has
        no stream left."""
        while self.links["client"].streams():
            self.now = min(d for link in self.links.values()
                           if (d := link.next_deadline()) is not None)
            for link in self.links.values():
                link.handle_timer(self.now)
                self.transfer()

    def update(self) -> None:
        """Print each side's new events and state changes; let the server app react."""
        for side, link in self.links.items():
            while events := link.next_events():
                for event in events:
                    self.say(f"{side}  event {describe(event)}")
                    if isinstance(event, FlowEnded):
                        self.show_state(side, event.stream, event.state)
                        del self.states[side, event.stream]
                self.sync_states(side)
                for event in events if side == "server" else ():
                    self.serve(event)
            self.sync_states(side)

    def sync_states(self, side: str) -> None:
        link = self.links[side]
        for stream in link.streams():
            state = link.flow_state(stream)
            if state is not None and state is not self.states.get((side, stream)):
                self.show_state(side, stream, state)

    def show_state(self, side: str, stream: int, state: FlowState) -> None:
        old = self.states.get((side, stream))
        change = state.name if old is None else f"{old.name} -> {state.name}"
        self.say(f"{side}  stream {stream}: {change}")
        self.states[side, stream] = state

    def serve(self, event: Event) -> None:
        """The server's application: an echo service named "oecho"."""
        server = self.links["server"]
        if isinstance(event, FlowOpenRequested):
            if event.service == "oecho":
                server.accept_flow(event.stream, self.now)
            else:
                server.reject_flow(event.stream, ErrorCode.NO_SUCH_SERVICE,
                                   f"no service {event.service!r}", self.now)
        elif isinstance(event, DataReceived):
            server.send_data(event.stream, event.data, self.now)
            server.consumed(event.stream, len(event.data), self.now)
        elif isinstance(event, FinReceived):
            server.dealloc(event.stream, self.now)


def main() -> None:
    demo = Demo()
    client = demo.links["client"]
    demo.say("== handshake")
    demo.transfer()

    demo.say("== flow 1: echo, then the client half-closes and the server deallocates")
    stream = client.open_flow("oecho", demo.now, liveness=LIVENESS)
    demo.transfer()
    client.send_data(stream, b"Client says hi!", demo.now)
    demo.transfer()
    client.send_fin(stream, demo.now)
    demo.transfer()

    demo.say(f"== flow 2: the server goes silent; the client's liveness is {LIVENESS:g} s")
    stream = client.open_flow("oecho", demo.now, liveness=LIVENESS)
    demo.transfer()
    demo.say("(from now on, nothing the server sends reaches the client)")
    demo.blackhole = True
    demo.run_timers()
    if demo.states:
        raise SystemExit(f"streams that never ended: {sorted(demo.states)}")
    demo.say("== done: every flow ended, once, on each side")


if __name__ == "__main__":
    main()
