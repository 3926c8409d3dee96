"""Coverage-guided fuzzing of the frame decoder (tether.wire) with atheris.

    python fuzz/fuzz_wire.py -atheris_runs=100000          # a bounded run
    python fuzz/fuzz_wire.py corpus_dir/ -max_total_time=600

Input layout: byte 0 selects how many of the next bytes (0-7) are chunk sizes (its low
three bits) and whether DATA payloads are passed on as they arrive (bit 3: `split_data`,
what `tether.Link` uses); the rest is the byte stream, fed to one `FrameDecoder` in chunks
of those sizes, cycled (all at once if there are none). Invariants checked for every input:

* only `ProtocolError` escapes `feed`, and once raised the decoder keeps raising it;
* `buffered` stays below one header plus the largest payload the decoder accepts;
* every decoded frame re-encodes to bytes that decode to an equal frame.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from tether import wire
    from tether.errors import ProtocolError

MAX_PAYLOAD = 1024
HARD_MAX = 4096
# Longest bulk or control payload; a decoder holds less than one header plus this.
BUFFER_BOUND = wire.HEADER.size + max(MAX_PAYLOAD + 10, wire.CONTROL_PAYLOAD_MAX)


def _chunks(data: bytes) -> list[bytes]:
    if not data:
        return []
    n = data[0] % 8
    sizes = [1 + s for s in data[1:1 + n]]
    stream = data[1 + n:]
    if not sizes:
        return [stream]
    out = []
    pos = i = 0
    while pos < len(stream):
        size = sizes[i % len(sizes)]
        out.append(stream[pos:pos + size])
        pos += size
        i += 1
    return out


def _check_reencodes(frame: wire.Frame) -> None:
    raw = wire.encode(frame)
    again = wire.FrameDecoder(max_payload=MAX_PAYLOAD, hard_max=HARD_MAX).feed(raw)
    assert again == [frame], (frame, raw, again)


def TestOneInput(data: bytes) -> None:  # the name atheris expects
    decoder = wire.FrameDecoder(max_payload=MAX_PAYLOAD, hard_max=HARD_MAX,
                                split_data=bool(data and data[0] & 8))
    for chunk in _chunks(data):
        try:
            frames = decoder.feed(chunk)
        except ProtocolError as exc:
            assert str(exc), "ProtocolError without a message"
            try:
                decoder.feed(b"")
            except ProtocolError as again:
                assert again is exc, (exc, again)
            else:
                raise AssertionError("decoder accepted input after an error") from None
            return
        assert decoder.buffered < BUFFER_BOUND, decoder.buffered
        for frame in frames:
            _check_reencodes(frame)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
