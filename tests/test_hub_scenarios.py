"""Random open/send/close interleavings over a few real connections (hypothesis):
per-connection order, exactly one Closed per Opened, no data lost or invented."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_hub_support import Recorder, connect, reset, until
from tether.hub import Hub
from tether.ids import FlowId

ACTIONS = ["open", "send", "send", "send", "close", "reset", "half", "hubclose", "reply"]


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    port: int
    sent: list[bytes] = field(default_factory=list)
    ended: str = ""  # "", "close", "reset", "half", "hubclose"


async def scenario(steps: list[tuple[str, int]]) -> None:
    async with Hub(idle_timeout=None) as hub:
        rec = Recorder(hub).start()
        clients: list[Client] = []
        by_port: dict[int, FlowId] = {}

        def fid_of(client: Client) -> FlowId | None:
            if not by_port:
                for fid in rec.opened:
                    event = rec.by_id[fid][0]
                    by_port[int(event.peer.rsplit(":", 1)[1])] = fid  # type: ignore[union-attr]
            return by_port.get(client.port)

        for action, n in steps:
            live = [c for c in clients if not c.ended]
            if action == "open" or not live:
                if len(clients) < 6:
                    reader, writer = await connect(hub.port)
                    port = writer.get_extra_info("sockname")[1]
                    clients.append(Client(reader, writer, port))
                continue
            client = live[n % len(live)]
            if action == "send":
                line = b"%d-%d" % (client.port, len(client.sent))
                client.sent.append(line)
                client.writer.write(line + b"\n")
            elif action == "close":
                client.ended = "close"
                client.writer.close()
            elif action == "reset":
                client.ended = "reset"
                reset(client.writer)
            elif action == "half":
                client.ended = "half"
                client.writer.write_eof()
            else:
                def known(c: Client = client) -> bool:
                    if fid_of(c) is not None:
                        return True
                    by_port.clear()  # rebuilt at the next look
                    return False

                await until(known)
                fid = fid_of(client)
                assert fid is not None
                if action == "hubclose":
                    client.ended = "hubclose"
                    hub.close(fid)
                elif hub.is_open(fid):
                    hub.send(fid, b"reply")
            await asyncio.sleep(0)
        for client in clients:
            if not client.ended:
                client.ended = "close"
                client.writer.close()
        await until(lambda: len(rec.closed) == len(clients), what="every Closed")
        await asyncio.sleep(0.02)  # nothing more may come
        rec.check_exactly_once()
        by_port.clear()
        # a client closing with unread replies makes its kernel send a RST: "reset"
        expected = {"close": {"peer", "reset"}, "half": {"peer"}, "reset": {"reset", "peer"},
                    "hubclose": {"local", "peer", "reset"}}
        for client in clients:
            fid = fid_of(client)
            assert fid is not None
            got = rec.data(fid)
            if client.ended in ("close", "half"):
                assert got == client.sent
            else:
                assert got == client.sent[:len(got)]
            assert rec.closed[fid] in expected[client.ended], (client.ended, rec.closed[fid])
            client.writer.close()
        stats = hub.stats()
        assert stats.opened == len(clients) == stats.closed_total
        await rec.stop()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 5)), max_size=30))
def test_random_interleavings_keep_order_and_close_exactly_once(
        steps: list[tuple[str, int]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(steps), 20))
