"""Fuzz smtpgate's milter decoder: no input may crash it, and how the octets are split must not matter.

Run: .venv/bin/python tests/fuzz/fuzz_milter.py -max_total_time=60
"""

import struct
import sys

import atheris

with atheris.instrument_imports():
    from smtpgate.frontends.milter.codec import Decoder, ProtocolError

MAX_PACKET = 4096
# Whole packets of every command, so the fuzzer reaches the payload parsers quickly.
SEEDS = [
    b"O" + struct.pack("!III", 6, 0x1FF, 0x1FFFFF),
    b"DC{client_addr}\x00192.0.2.7\x00", b"DM", b"Chost\x004\x00\x19192.0.2.7\x00", b"Chost\x00U",
    b"Chost\x00L\x00\x00/sock\x00", b"Hhelo\x00", b"M<a@b>\x00SIZE=1\x00", b"R<pl-payroll@corp.example>\x00",
    b"LSubject\x00 x\n\ty\x00", b"N", b"Bbody\r\n", b"E", b"A", b"Q", b"K", b"T", b"UXYZZY\x00", b"Z",
]


def decode(chunks: list[bytes]) -> tuple[list, str | None]:
    decoder = Decoder(MAX_PACKET)
    events: list = []
    try:
        for chunk in chunks:
            events += decoder.feed(chunk)
    except ProtocolError as exc:
        return events, str(exc)
    assert decoder.pending < 4 + MAX_PACKET
    return events, None


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    stream = bytearray()
    while fdp.remaining_bytes():
        if fdp.ConsumeBool():
            body = SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)]
        else:
            body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))
        if fdp.ConsumeBool():
            stream += struct.pack("!I", len(body)) + body
        else:
            stream += body
    stream = bytes(stream)
    whole, error = decode([stream])
    # The same octets one at a time: the same events up to the same error.
    pieces, error_pieces = decode([stream[i:i + 1] for i in range(len(stream))])
    assert (error is None) == (error_pieces is None), (error, error_pieces)
    if error is None:
        assert whole == pieces
    else:
        # Split reads see the events before the garbage; one read loses them with it.
        assert pieces[:len(whole)] == whole


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
