"""Two sans-IO Links talking in memory, with a hand-driven clock (aioquic/h11 style)."""

from __future__ import annotations

from collections.abc import Callable

from tether.events import Event, FlowEnded, HandshakeCompleted
from tether.link import Link, LinkConfig, Role


class Pair:
    """A CLIENT and a SERVER link wired back to back. `now` only moves when told to."""

    def __init__(self, client: LinkConfig | None = None, server: LinkConfig | None = None,
                 now: float = 0.0,
                 chunker: Callable[[bytes], list[bytes]] | None = None) -> None:
        self.now = now
        self.client = Link(Role.CLIENT, client or LinkConfig(name="client"), now)
        self.server = Link(Role.SERVER, server or LinkConfig(name="server"), now)
        self.events: dict[str, list[Event]] = {"client": [], "server": []}
        self.chunker = chunker or (lambda b: [b])
        self.cut = False

    def side(self, name: str) -> Link:
        return self.client if name == "client" else self.server

    def transfer(self, rounds: int = 50) -> None:
        """Move bytes both ways until both are quiet; collect events."""
        for _ in range(rounds):
            moved = False
            for src, dst in ((self.client, self.server), (self.server, self.client)):
                data = src.data_to_send()
                if data and not self.cut:
                    moved = True
                    for chunk in self.chunker(data):
                        dst.receive_data(chunk, self.now)
            self.collect()
            if not moved:
                return
        raise AssertionError("links did not go quiet")

    def collect(self) -> None:
        self.events["client"] += self.client.next_events()
        self.events["server"] += self.server.next_events()

    def take(self, name: str) -> list[Event]:
        self.collect()
        out, self.events[name] = self.events[name], []
        return out

    def handshake(self) -> None:
        self.transfer()
        assert any(isinstance(e, HandshakeCompleted) for e in self.take("client"))
        assert any(isinstance(e, HandshakeCompleted) for e in self.take("server"))

    def advance(self, until: float) -> None:
        """Drive both links' timers up to `until`, as an adapter would."""
        for _ in range(1_000_000):
            deadlines = [d for d in (self.client.next_deadline(), self.server.next_deadline())
                         if d is not None and d <= until]
            if not deadlines:
                break
            self.now = max(self.now, min(deadlines))
            self.client.handle_timer(self.now)
            self.server.handle_timer(self.now)
            self.transfer()
        self.now = until
        self.transfer()

    def open(self, service: str = "svc", liveness: float | None = None) -> tuple[int, int]:
        """Open a flow client->server and accept it; returns (client id, server id)."""
        sid = self.client.open_flow(service, self.now, liveness=liveness)
        self.transfer()
        self.server.accept_flow(sid, self.now)
        self.transfer()
        return sid, sid


def ended(events: list[Event]) -> dict[int, FlowEnded]:
    """The FlowEnded events by stream; asserts at most one per stream."""
    out: dict[int, FlowEnded] = {}
    for e in events:
        if isinstance(e, FlowEnded):
            assert e.stream not in out, f"two FlowEnded for stream {e.stream}"
            out[e.stream] = e
    return out
