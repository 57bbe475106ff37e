"""The milter codec: packets built by hand (struct, as Postfix's milter8.c lays them out) in, events out."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.frontends.milter import codec
from smtpgate.frontends.milter.codec import (
    Abort, Body, Connect, Data, Decoder, EndOfHeaders, EndOfMessage, Header, Helo, Macros, Mail, Negotiate,
    ProtocolError, Quit, QuitNewConnection, Rcpt, Unknown,
)


def pkt(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


OPTNEG = pkt(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
CONNECT4 = pkt(b"C", b"client.example\x00" + b"4" + struct.pack("!H", 40000) + b"192.0.2.7\x00")
MACROS = pkt(b"D", b"C" + b"{client_addr}\x00192.0.2.7\x00j\x00mx.corp.example\x00")
MESSAGE = b"".join([
    OPTNEG,
    MACROS,
    CONNECT4,
    pkt(b"H", b"client.test\x00"),
    pkt(b"D", b"M" + b"i\x00ABC123\x00{auth_authen}\x00alice\x00"),
    pkt(b"M", b"<uk-payroll+101203-T@corp.example>\x00BODY=8BITMIME\x00"),
    pkt(b"R", b"<pl-payroll@corp.example>\x00NOTIFY=SUCCESS,FAILURE\x00ORCPT=rfc822;pl-payroll@corp.example\x00"),
    pkt(b"T"),
    pkt(b"L", b"Subject\x00 Invoice 4411\x00"),
    pkt(b"L", b"Cc\x00 a@b,\n\tc@d\x00"),
    pkt(b"N"),
    pkt(b"B", b"body\r\n"),
    pkt(b"E"),
    pkt(b"A"),
    pkt(b"U", b"XYZZY\x00"),
    pkt(b"K"),
    pkt(b"Q"),
])

EVENTS = [
    Negotiate(6, 0x1FF, 0x1FFFFF),
    Macros("C", (("{client_addr}", "192.0.2.7"), ("j", "mx.corp.example"))),
    Connect("client.example", "4", 40000, "192.0.2.7"),
    Helo("client.test"),
    Macros("M", (("i", "ABC123"), ("{auth_authen}", "alice"))),
    Mail(("<uk-payroll+101203-T@corp.example>", "BODY=8BITMIME")),
    Rcpt(("<pl-payroll@corp.example>", "NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;pl-payroll@corp.example")),
    Data(),
    Header("Subject", b" Invoice 4411"),
    Header("Cc", b" a@b,\n\tc@d"),
    EndOfHeaders(),
    Body(b"body\r\n"),
    EndOfMessage(b""),
    Abort(),
    Unknown("XYZZY"),
    QuitNewConnection(),
    Quit(),
]


def test_a_whole_session_at_once():
    decoder = Decoder()
    assert decoder.feed(MESSAGE) == EVENTS
    assert decoder.pending == 0


def test_one_octet_at_a_time_gives_the_same_events():
    decoder = Decoder()
    events = []
    for i in range(len(MESSAGE)):
        events += decoder.feed(MESSAGE[i:i + 1])
        if i < len(MESSAGE) - 1:
            assert decoder.pending or events
    assert events == EVENTS
    assert decoder.pending == 0


def test_pending_counts_a_partial_packet():
    decoder = Decoder()
    assert decoder.feed(OPTNEG[:7]) == []
    assert decoder.pending == 7
    assert decoder.feed(OPTNEG[7:]) == [EVENTS[0]]
    assert decoder.pending == 0


@given(st.lists(st.integers(min_value=0, max_value=len(MESSAGE)), max_size=12))
def test_any_split_gives_the_same_events(cuts):
    decoder = Decoder()
    events = []
    bounds = [0, *sorted(cuts), len(MESSAGE)]
    for a, b in zip(bounds, bounds[1:]):
        events += decoder.feed(MESSAGE[a:b])
    assert events == EVENTS


def test_connect_other_families():
    unix = pkt(b"C", b"localhost\x00L" + struct.pack("!H", 0) + b"/run/x.sock\x00")
    unknown = pkt(b"C", b"unknown\x00U")
    six = pkt(b"C", b"[2001:db8::1]\x006" + struct.pack("!H", 25) + b"2001:db8::1\x00")
    assert Decoder().feed(unix + unknown + six) == [
        Connect("localhost", "L", 0, "/run/x.sock"),
        Connect("unknown", "U", None, None),
        Connect("[2001:db8::1]", "6", 25, "2001:db8::1"),
    ]


def test_macro_packet_with_no_macros_and_end_of_message_with_data():
    assert Decoder().feed(pkt(b"D", b"R") + pkt(b"E", b"last")) == [Macros("R", ()), EndOfMessage(b"last")]


def test_non_utf8_octets_survive_a_round_trip():
    raw = b"<caf\xe9@corp.example>"
    [event] = Decoder().feed(pkt(b"R", raw + b"\x00"))
    assert codec.encode_delete_recipient(event.args[0]) == pkt(b"-", raw + b"\x00")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack("!I", 0), "length 0"),
        (struct.pack("!I", codec.MAX_PACKET + 1), "over the limit"),
        (pkt(b"O", b"\x00" * 11), "OPTNEG"),
        (pkt(b"O", b"\x00" * 13), "OPTNEG"),
        (pkt(b"D"), "no event letter"),
        (pkt(b"D", b"Cname\x00"), "without a value"),
        (pkt(b"D", b"Cname\x00value"), "NUL-terminated"),
        (pkt(b"C", b"host"), "no host name"),
        (pkt(b"C", b"host\x00"), "no host name"),
        (pkt(b"C", b"host\x00Uextra"), "unexpected data"),
        (pkt(b"C", b"host\x004\x00"), "bad family"),
        (pkt(b"C", b"host\x00X\x00\x19a\x00"), "bad family"),
        (pkt(b"C", b"host\x004\x00\x19a\x00b\x00"), "after the address"),
        (pkt(b"H", b"a\x00b\x00"), "more than one string"),
        (pkt(b"H", b"name"), "NUL-terminated"),
        (pkt(b"M"), "NUL-terminated"),
        (pkt(b"R", b"<a@b>"), "NUL-terminated"),
        (pkt(b"L", b"Subject\x00"), "a name and a value"),
        (pkt(b"L", b"\x00value\x00"), "a name and a value"),
        (pkt(b"L", b"a\x00b\x00c\x00"), "a name and a value"),
        (pkt(b"N", b"x"), "EndOfHeaders"),
        (pkt(b"A", b"x"), "Abort"),
        (pkt(b"Z"), "unknown command"),
    ],
)
def test_garbage_is_a_protocol_error(data, reason):
    decoder = Decoder()
    with pytest.raises(ProtocolError, match=reason):
        decoder.feed(data)
    # A broken stream stays broken: nothing after the garbage is believed.
    with pytest.raises(ProtocolError, match=reason):
        decoder.feed(OPTNEG)


def test_oversize_is_refused_before_its_data_arrives():
    decoder = Decoder(max_packet=100)
    decoder.feed(struct.pack("!I", 100) + b"B")  # at the limit: waits for the data
    assert decoder.pending == 5
    with pytest.raises(ProtocolError, match="101 octets"):
        Decoder(max_packet=100).feed(struct.pack("!I", 101))


def test_events_before_garbage_in_the_same_read_are_lost_with_it():
    # The connection is closed on a ProtocolError: what came with the garbage is not acted on.
    with pytest.raises(ProtocolError):
        Decoder().feed(OPTNEG + pkt(b"Z"))


# ----------------------------------------------------------------- encoding


def test_reply_packets():
    assert codec.CONTINUE == b"\x00\x00\x00\x01c"
    assert codec.ACCEPT == b"\x00\x00\x00\x01a"
    assert codec.TEMPFAIL == b"\x00\x00\x00\x01t"
    assert codec.REJECT == b"\x00\x00\x00\x01r"
    assert codec.PROGRESS == b"\x00\x00\x00\x01p"


def test_negotiate_with_and_without_macro_lists():
    assert codec.encode_negotiate(6, 0x9C, 0x1F0) == pkt(b"O", struct.pack("!III", 6, 0x9C, 0x1F0))
    got = codec.encode_negotiate(6, 1, 2, {codec.SMFIM_CONNECT: "{client_addr}", codec.SMFIM_EOM: "i"})
    assert got == pkt(b"O", struct.pack("!III", 6, 1, 2) + struct.pack("!I", 0) + b"{client_addr}\x00"
                      + struct.pack("!I", 5) + b"i\x00")


def test_modification_requests():
    assert codec.encode_delete_recipient("<pl-payroll@corp.example>") == pkt(b"-", b"<pl-payroll@corp.example>\x00")
    assert codec.encode_add_recipient("<a+1-T@b>") == pkt(b"+", b"<a+1-T@b>\x00")
    assert codec.encode_add_recipient("<a+1-T@b>", "NOTIFY=NEVER ORCPT=rfc822;a@b") == pkt(
        b"2", b"<a+1-T@b>\x00NOTIFY=NEVER ORCPT=rfc822;a@b\x00")
    assert codec.encode_add_recipient("<a@b>", "") == pkt(b"2", b"<a@b>\x00\x00")
    assert codec.encode_change_header(2, "Cc", b" x,\n\ty") == pkt(b"m", struct.pack("!I", 2) + b"Cc\x00 x,\n\ty\x00")
    assert codec.encode_add_header("Message-ID", b" <x@y>") == pkt(b"h", b"Message-ID\x00 <x@y>\x00")
    assert codec.encode_reply_code("451 4.3.0 100% busy") == pkt(b"y", b"451 4.3.0 100%% busy\x00")


def test_encoding_refuses_what_the_wire_cannot_carry():
    with pytest.raises(ValueError, match="NUL"):
        codec.encode_add_header("X", b"a\x00b")
    with pytest.raises(ValueError, match="out of range"):
        codec.encode_change_header(0, "Cc", b"x")
