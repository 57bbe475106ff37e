"""The DATA scanner and the header/body boundary."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.mail.dataguard import DataProblem, StreamGuard, crlf_only, find_header_end, find_in_slices, scan_data


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", None),
        (b"Subject: x\r\n\r\nbody\r\n", None),
        (b"Subject: x\r\n\r\n\r\n\r\n", None),
        (b"Subject: x\rBcc: y\r\n\r\n", DataProblem("bare_cr", 10)),
        (b"Subject: x\nBcc: y\r\n\r\n", DataProblem("bare_lf", 10)),
        (b"Subject: x\x00\r\n\r\n", DataProblem("nul", 10)),
        (b"Subject: x\r\n\r\nbody\r\n.\r", DataProblem("bare_cr", 21)),
        (b"Subject: x\r\n\r\nbody\n.\n", DataProblem("bare_lf", 18)),
        (b"\n", DataProblem("bare_lf", 0)),
        (b"\r", DataProblem("bare_cr", 0)),
        (b"\r\r\n", DataProblem("bare_cr", 0)),
        (b"\r\n\n", DataProblem("bare_lf", 2)),
        (b"a\x00\n\r", DataProblem("nul", 1)),
        (b"a\r\n\rb\x00", DataProblem("bare_cr", 3)),
        # SMTP smuggling shapes: <LF>.<CR><LF> and <CR>.<CR><LF> inside the data
        (b"Subject: x\r\n\r\nbody\n.\r\nMAIL FROM:<a@b>\r\n", DataProblem("bare_lf", 18)),
        (b"Subject: x\r\n\r\nbody\r.\r\nMAIL FROM:<a@b>\r\n", DataProblem("bare_cr", 18)),
        (b"8bit \xc3\xa9 \xff\r\n", None),
    ],
)
def test_scan_data(raw: bytes, expected: DataProblem | None) -> None:
    assert scan_data(raw) == expected


@given(st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b""))))
def test_clean_crlf_data_passes(lines: list[bytes]) -> None:
    assert scan_data(b"".join(line + b"\r\n" for line in lines)) is None


@given(st.binary(max_size=100))
def test_scan_finds_the_first_problem(raw: bytes) -> None:
    problem = scan_data(raw)
    offsets = [i for i, b in enumerate(raw) if b == 0]
    offsets += [i for i, b in enumerate(raw) if b == 13 and raw[i + 1 : i + 2] != b"\n"]
    offsets += [i for i, b in enumerate(raw) if b == 10 and (i == 0 or raw[i - 1] != 13)]
    if not offsets:
        assert problem is None
    else:
        assert problem is not None and problem.offset == min(offsets)
        assert problem.kind == {0: "nul", 13: "bare_cr", 10: "bare_lf"}[raw[problem.offset]]


@pytest.mark.parametrize(
    ("raw", "end"),
    [
        (b"Subject: x\r\n\r\nbody", 14),
        (b"Subject: x\r\n", 12),
        (b"Subject: x", 10),
        (b"", 0),
        (b"\r\nbody", 2),
        # a first line starting with white space is no header: all body
        (b" Subject: x\r\n\r\nbody", 0),
        (b"\tSubject: x\r\n\r\nbody", 0),
        # a line without a colon ends the header block; it is the first body line
        (b"Subject: x\r\nnot a header\r\nTo: a@b\r\n\r\n", 12),
        (b"Subject: x\r\nFrom a@b Fri Nov 27\r\n\r\n", 12),
        (b"Subject: x\r\n: no name\r\n\r\n", 12),
        (b"Subject: x\r\nBad Name: y\r\n\r\n", 12),
        # obsolete white space before the colon is still a header (RFC 5322 4.5)
        (b"Subject : x\r\nTo\t: a@b\r\n\r\nbody", 25),
        (b"Subject: x\r\n  folded\r\n\tmore\r\n\r\nbody", 31),
    ],
)
def test_header_end(raw: bytes, end: int) -> None:
    assert find_header_end(raw) == end


@given(st.binary(max_size=200))
def test_the_counting_shortcut_decides_as_the_byte_scan(data):
    import re

    oracle = re.search(rb"\r(?!\n)|(?<!\r)\n|\x00", data)
    found = scan_data(data)
    assert (found is None) == (oracle is None)
    if oracle is not None:
        assert found.offset == oracle.start()


# Whole-message searches a slice at a time must answer as the one-call search would,
# wherever a slice boundary falls (a CRLF or the searched bytes split across two slices).
_octets = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\0", b"\r\n."]), max_size=16).map(b"".join)


@given(data=_octets, start=st.integers(0, 6), slice_octets=st.integers(1, 7))
def test_crlf_only_in_slices_is_the_whole_count(data, start, slice_octets):
    rest = data[start:]
    expected = b"\0" not in rest and rest.count(b"\r") == rest.count(b"\n") == rest.count(b"\r\n")
    assert crlf_only(data, start, slice_octets=slice_octets) is expected


@given(data=_octets, sub=st.sampled_from([b"\r\n.", b"\n", b".."]), start=st.integers(0, 6),
       slice_octets=st.integers(1, 7))
def test_find_in_slices_is_find(data, sub, start, slice_octets):
    assert find_in_slices(data, sub, start, slice_octets=slice_octets) == data.find(sub, start)


_guard_octets = st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"\0", b"."]), max_size=40).map(b"".join)


@given(data=_guard_octets, cuts=st.lists(st.integers(0, 40), max_size=6))
def test_the_stream_guard_finds_what_scan_data_finds_however_the_data_is_cut(data, cuts):
    guard = StreamGuard()
    edges = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    found = [guard.add(data[a:b]) for a, b in zip(edges, edges[1:])]
    assert guard.finish() == scan_data(data)
    # Once found, the problem stays, and it was reported by the piece that held it.
    problem = scan_data(data)
    if problem is not None:
        assert problem in found or guard.finish() == problem
        assert guard.add(b"more") == problem


def test_the_stream_guard_judges_a_cr_at_a_piece_end_by_the_next_piece():
    guard = StreamGuard()
    assert guard.add(b"line\r") is None
    assert guard.add(b"\nnext\r") is None
    assert guard.add(b"x") == DataProblem("bare_cr", 10)
    assert guard.finish() == DataProblem("bare_cr", 10)
    lone_lf = StreamGuard()
    assert lone_lf.add(b"line\r\n") is None and lone_lf.add(b"") is None
    assert lone_lf.add(b"\nafter") == DataProblem("bare_lf", 6)
