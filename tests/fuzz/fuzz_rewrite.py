"""Fuzz smtpgate's header rewriter: it must never crash, add or drop a line, or touch the body.

Run: .venv/bin/python tests/fuzz/fuzz_rewrite.py -max_total_time=60
"""

import sys

import atheris

with atheris.instrument_imports():
    from smtpgate.mail.dataguard import scan_data
    from smtpgate.mail.headers import parse_header_block
    from smtpgate.mail.rewrite import rewrite_headers

MAPPING = {
    "pl-payroll@corp.example": "pl-payroll+900001-T@corp.example",
    "a@b": '"a b+1-T"@b',
}
SEEDS = [b"To: ", b"Cc: ", b"From: ", b"Reply-To: ", b"pl-payroll@corp.example", b"a@b", b"\r\n", b"\r\n ", b"<", b">",
         b'"', b"(", b")", b",", b";", b":", b"=?utf-8?q?", b"?=", b"\r\n\r\n"]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    pieces = []
    while fdp.remaining_bytes():
        if fdp.ConsumeBool():
            pieces.append(SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)])
        else:
            pieces.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8)))
    raw = b"".join(pieces)
    scan_data(raw)
    assert rewrite_headers(raw, {}) is raw
    new = rewrite_headers(raw, MAPPING)
    old_block, new_block = parse_header_block(raw), parse_header_block(new)
    assert [f.name for f in old_block.fields] == [f.name for f in new_block.fields]
    assert new.count(b"\n") == raw.count(b"\n") and new.count(b"\r") == raw.count(b"\r")
    assert new[new_block.header_end :] == raw[old_block.header_end :]
    for old, new_field in zip(old_block.fields, new_block.fields):
        if old.name.lower() not in ("to", "cc", "from", "reply-to"):
            assert old.raw == new_field.raw


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
