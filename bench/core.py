"""Benchmarks of tether's sans-IO core: the wire codec and the liveness timing wheel.

    .venv/bin/python bench/core.py            # full run, < 60 s
    .venv/bin/python bench/core.py --quick    # smoke run, < 10 s

One JSON object per line on stdout, one per result::

    {"bench": "wire", "name": "decode_whole_fps", "value": ..., "unit": "frames/s", ...}

Nothing here touches a socket or reads a wall clock inside the code under test: the
codec is fed bytes, and the liveness monitor is driven in *simulated* time (the core
takes ``now`` as a parameter) while the CPU time it really costs is measured with
``time.process_time``. Numbers are for information only; no test asserts on them.

Wheel scenario (``bench: "wheel"``): N idle flows with a 120 s liveness timeout. Each
flow's peer sends a keepalive every 30 s (``received(key, now)`` at its exact time;
the N peers are spread evenly over the 30 s), and since our side has nothing to send,
``poll`` hands back a keepalive for each key every 30 s (KEEPALIVE_FRACTION = 1/4).
The driver calls ``poll(now)`` at ``next_deadline()``, as the asyncio adapter does.
The same scenario is run on a heapq-based monitor with the same lazy re-arming, as a
baseline.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import os
import sys
import time
from collections.abc import Callable

try:
    from tether import wire
    from tether.liveness import LivenessMonitor
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from tether import wire
    from tether.liveness import LivenessMonitor

from benchlib import cpu_pressure, emit, source_rev


def best_of(repeat: int, fn: Callable[[], int]) -> tuple[float, int]:
    """Run ``fn`` ``repeat`` times; (least CPU time, its return value).

    CPU time (``process_time``), not wall time: on a shared machine a descheduled
    run would otherwise look slow. The code under test never waits.
    """
    best = float("inf")
    result = 0
    for _ in range(repeat):
        gc.collect()
        t0 = time.process_time()
        result = fn()
        dt = time.process_time() - t0
        best = min(best, dt)
    return best, result


# ---------------------------------------------------------------------------------------
# wire: DATA frames encoded and decoded per second


def bench_wire(quick: bool) -> None:
    for payload in (64, 16 * 1024):
        _bench_payload(payload, quick)
        gc.collect()


def _bench_payload(payload: int, quick: bool) -> None:
    repeat = 3 if quick else 5
    # at most 200k frames or 32 MB (a quarter of that in quick mode)
    nframes = min(200_000, (32 << 20) // payload)
    if quick:
        nframes //= 4
    data = bytes(range(256)) * (payload // 256) if payload >= 256 else b"x" * payload
    frame_size = wire.HEADER.size + payload
    ctx = {"payload": payload, "n": nframes, "frame_bytes": frame_size}

    # encode: the Frame-object path (wire.encode) and the Link's zero-join path
    # (encode_data_header, header and payload handed to the transport separately)
    def enc_frame() -> int:
        encode = wire.encode
        frame = wire.Data(1, data)
        total = 0
        for _ in range(nframes):
            total += len(encode(frame))
        return total

    def enc_header() -> int:
        header = wire.encode_data_header
        out: list[bytes] = []
        append = out.append
        for i in range(nframes):
            append(header(1 + (i & 7) * 2, payload))
            append(data)
        return len(out)

    dt, _ = best_of(repeat, enc_frame)
    emit("wire", "encode_fps", nframes / dt, "frames/s", **ctx)
    emit("wire", "encode_MBps", nframes * frame_size / dt / 1e6, "MB/s", **ctx)
    dt, _ = best_of(repeat, enc_header)
    emit("wire", "encode_header_fps", nframes / dt, "frames/s", **ctx)

    # decode: one buffer of many frames, fed whole and in 1500-byte chunks
    header = wire.encode_data_header
    buf = b"".join(header(1 + (i & 7) * 2, payload) + data for i in range(nframes))
    chunks = [buf[i:i + 1500] for i in range(0, len(buf), 1500)]

    def dec_whole() -> int:
        dec = wire.FrameDecoder()
        n = len(dec.feed(buf))
        assert dec.buffered == 0
        return n

    def dec_chunked() -> int:
        dec = wire.FrameDecoder()
        feed = dec.feed
        n = 0
        for chunk in chunks:
            n += len(feed(chunk))
        assert dec.buffered == 0
        return n

    dt, n = best_of(repeat, dec_whole)
    assert n == nframes, (n, nframes)
    emit("wire", "decode_whole_fps", nframes / dt, "frames/s", **ctx)
    emit("wire", "decode_whole_MBps", len(buf) / dt / 1e6, "MB/s", **ctx)
    dt, n = best_of(repeat, dec_chunked)
    assert n == nframes, (n, nframes)
    emit("wire", "decode_1500B_fps", nframes / dt, "frames/s", chunk=1500, **ctx)
    emit("wire", "decode_1500B_MBps", len(buf) / dt / 1e6, "MB/s", chunk=1500, **ctx)

    # a full round trip per frame: encode one frame, decode it (a 1-frame feed)
    def round_trip() -> int:
        dec = wire.FrameDecoder()
        feed = dec.feed
        encode = wire.encode
        frame = wire.Data(1, data)
        n = 0
        for _ in range(nframes // 4):
            n += len(feed(encode(frame)))
        return n

    dt, n = best_of(repeat, round_trip)
    emit("wire", "roundtrip_1frame_fps", n / dt, "frames/s", payload=payload, n=n,
         note="encode one Data frame then feed it alone to a decoder")


# ---------------------------------------------------------------------------------------
# liveness: a heapq baseline with the same policy and the same lazy re-arming


class _HPeer:
    __slots__ = ("interval", "last_recv", "last_send", "timeout")

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        self.interval = timeout * 0.25
        self.last_recv = now
        self.last_send = now


class HeapLiveness:
    """LivenessMonitor's add/received/poll/next_deadline on a binary heap.

    Lazy like the wheel: ``received`` only stores a timestamp; each key has one heap
    entry, re-pushed at its true next deadline when it comes due.
    """

    def __init__(self, tick: float) -> None:
        self._peers: dict[int, _HPeer] = {}
        self._heap: list[tuple[float, int]] = []
        self._tick = tick

    def add(self, key: int, timeout: float, now: float) -> None:
        peer = _HPeer(timeout, now)
        self._peers[key] = peer
        heapq.heappush(self._heap, (now + peer.interval, key))

    def received(self, key: int, now: float) -> None:
        peer = self._peers.get(key)
        if peer is not None:
            peer.last_recv = now

    def poll(self, now: float) -> tuple[list[int], list[int]]:
        heap = self._heap
        peers = self._peers
        pop = heapq.heappop
        keepalives: list[int] = []
        expired: list[int] = []
        rearm: list[tuple[float, int]] = []
        while heap and heap[0][0] <= now:
            _, key = pop(heap)
            peer = peers.get(key)
            if peer is None:
                continue
            expires_at = peer.last_recv + peer.timeout
            if now >= expires_at:
                expired.append(key)
                del peers[key]
                continue
            keepalive_at = peer.last_send + peer.interval
            if now >= keepalive_at:
                keepalives.append(key)
                peer.last_send = now
                keepalive_at = now + peer.interval
            rearm.append((keepalive_at if keepalive_at < expires_at else expires_at, key))
        push = heapq.heappush
        for item in rearm:
            push(heap, item)
        return keepalives, expired

    def next_deadline(self) -> float | None:
        # rounded up to the timer resolution, as the wheel's driver is: one wake-up
        # per tick at most, not one per key
        if not self._heap:
            return None
        tick = self._tick
        return -(-self._heap[0][0] // tick) * tick


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_wheel(impl: str, n: int, sim: float, warmup: float, tick: float) -> float:
    """Drive ``n`` idle keys for ``warmup + sim`` simulated seconds; measure the last
    ``sim`` seconds."""
    period = 30.0  # the peer's keepalive period
    timeout = 120.0
    dt = period / n  # spacing of peer keepalives, all keys together
    gc.collect()
    gc.disable()  # the cyclic GC would otherwise walk 1M objects now and then: its cost
    # is reported apart (gc_full_collect_ms), not mixed into the wheel's
    try:
        rss0 = _rss()
        t_build = time.process_time()
        mon: LivenessMonitor[int] | HeapLiveness = (
            LivenessMonitor(tick=tick, now=0.0) if impl == "wheel" else HeapLiveness(tick))
        add = mon.add
        # key i joins at its phase i*dt (as if it just exchanged a frame then)
        for i in range(n):
            add(i, timeout, i * dt)
        build_cpu = time.process_time() - t_build
        rss1 = _rss()
        received = mon.received
        poll = mon.poll
        next_deadline = mon.next_deadline
        pt = time.process_time

        # simulated time: peer keepalive number e (e >= n) arrives at e*dt for key e % n
        e = n
        now = 0.0
        end = warmup + sim
        cpu = cpu_recv = 0.0
        loop_overhead = 0.0
        poll_times: list[float] = []
        polls = keepalives = expired = received_calls = 0
        measuring = False
        while True:
            nd = next_deadline()
            limit = end if measuring else warmup
            if nd is None or nd > limit:
                nd = limit
            # every peer keepalive before `nd`, each at its own exact time
            e_end = max(e, int(nd / dt) + 1)
            while e_end > e and (e_end - 1) * dt >= nd:
                e_end -= 1
            batch = [(j % n, j * dt) for j in range(e, e_end)]
            e = e_end
            if batch:
                c0 = pt()
                for key, t in batch:
                    received(key, t)
                c1 = pt()
                for _key, _t in batch:  # the bare loop, to subtract
                    pass
                loop_overhead += pt() - c1
                cpu += c1 - c0
                cpu_recv += c1 - c0
                received_calls += len(batch)
            now = nd
            if measuring and now >= end:
                break
            c0 = pt()
            ka, ex = poll(now)
            spent = pt() - c0
            cpu += spent
            poll_times.append(spent)
            polls += 1
            keepalives += len(ka)
            expired += len(ex)
            if not measuring and now >= warmup:
                # the measured window starts right after the poll at `warmup`
                measuring = True
                cpu = cpu_recv = loop_overhead = 0.0
                polls = keepalives = expired = received_calls = 0
                poll_times.clear()
                t_start = now
        rss2 = _rss()
        c0 = time.process_time()
        gc.collect()  # what one full collection costs with the monitor populated
        gc_full = time.process_time() - c0
    finally:
        gc.enable()
    measured = now - t_start
    cpu_net = max(cpu - loop_overhead, 0.0)
    ctx = {"impl": impl, "n": n, "timeout_s": timeout, "peer_keepalive_s": period,
           "tick_s": tick if impl == "wheel" else None, "sim_s": round(measured, 3)}
    emit("wheel", "wheel_cpu_fraction" if impl == "wheel" else "heap_cpu_fraction",
         cpu_net / measured, "cores", cpu_s=cpu_net, **ctx)
    emit("wheel", f"{impl}_cpu_us_per_sim_s", cpu_net / measured * 1e6, "us/s", **ctx)
    emit("wheel", f"{impl}_keepalives_per_s", keepalives / measured, "1/s",
         expected=n / period, **ctx)
    emit("wheel", f"{impl}_polls_per_s", polls / measured, "1/s", **ctx)
    emit("wheel", f"{impl}_received_per_s", received_calls / measured, "1/s", **ctx)
    emit("wheel", f"{impl}_cpu_ns_per_keepalive", cpu_net / max(keepalives, 1) * 1e9, "ns",
         note="poll+received CPU per keepalive emitted (includes the received() calls)",
         **ctx)
    emit("wheel", f"{impl}_received_ns", max(cpu_recv - loop_overhead, 0.0)
         / max(received_calls, 1) * 1e9, "ns", note="CPU per received() call", **ctx)
    emit("wheel", f"{impl}_poll_us", (cpu - cpu_recv) / max(polls, 1) * 1e6, "us",
         note="CPU per poll() call", **ctx)
    poll_times.sort()
    emit("wheel", f"{impl}_poll_p99_us", poll_times[int(len(poll_times) * 0.99)] * 1e6, "us",
         note="CPU of one poll() call, 99th percentile", **ctx)
    emit("wheel", f"{impl}_poll_max_ms", poll_times[-1] * 1e3, "ms",
         note="the longest single poll(): how long it blocks the event loop", **ctx)
    emit("wheel", f"{impl}_expired", expired, "keys", note="should be 0: every peer is alive",
         **ctx)
    emit("wheel", f"{impl}_bytes_per_entry", (rss1 - rss0) / n, "B",
         note="RSS delta after adding n keys (int keys included)", **ctx)
    emit("wheel", f"{impl}_bytes_per_entry_steady", (rss2 - rss0) / n, "B",
         note="RSS delta at the end of the run", **ctx)
    emit("wheel", f"{impl}_add_ns", build_cpu / n * 1e9, "ns", **ctx)
    emit("wheel", f"{impl}_gc_full_collect_ms", gc_full * 1e3, "ms",
         note="one gc.collect() with the n entries alive (the runs above had gc disabled)",
         **ctx)
    del mon
    gc.collect()
    return cpu_net / measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a < 10 s smoke run")
    parser.add_argument("--only", choices=["wire", "wheel"], help="run one group only")
    parser.add_argument("--flows", type=int, default=None,
                        help="idle flows in the wheel run (default 1,000,000; quick 100,000)")
    parser.add_argument("--sim", type=float, default=None,
                        help="measured simulated seconds (default 240; quick 60)")
    parser.add_argument("--no-heap", action="store_true", help="skip the heapq baseline")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.only in (None, "wire"):
        bench_wire(args.quick)
    if args.only in (None, "wheel"):
        n = args.flows or (100_000 if args.quick else 1_000_000)
        sim = args.sim or (60.0 if args.quick else 240.0)
        warmup = 30.0
        wheel = bench_wheel("wheel", n, sim, warmup, tick=0.01)
        if not args.no_heap:
            # the baseline over a shorter window: its cost per simulated second is as
            # steady, and the whole script stays under a minute
            heap = bench_wheel("heap", n, min(sim, 30.0), warmup, tick=0.01)
            emit("wheel", "wheel_vs_heap_cpu", wheel / heap, "ratio", baseline="heapq",
                 ratio=wheel / heap, n=n, note="< 1: the wheel costs less CPU than a heap")
    emit("meta", "elapsed", time.perf_counter() - t0, "s", quick=args.quick,
         python=sys.version.split()[0], cpus=os.cpu_count(),
         loadavg=" ".join(f"{x:.2f}" for x in os.getloadavg()), cpu_pressure_avg10=cpu_pressure(),
         rev=source_rev())
    return 0


if __name__ == "__main__":
    sys.exit(main())
