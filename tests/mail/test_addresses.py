"""Address parsing, formatting, normalisation and plus tags."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.mail.addresses import (
    Address,
    AddressError,
    join_tag,
    locate_addresses,
    normalize_domain,
    parse_address_list,
    parse_path,
    split_tag,
)

# text, str(address), canonical, relay_domain
VALID_PATHS = [
    ("<a@b>", "a@b", "a@b", "b"),
    ("a@b", "a@b", "a@b", "b"),
    ("<UK-Payroll@Corp.Example>", "UK-Payroll@Corp.Example", "uk-payroll@corp.example", "corp.example"),
    ("<first.last@corp.example>", "first.last@corp.example", "first.last@corp.example", "corp.example"),
    ("<pl-payroll+5512-C@corp.example>", "pl-payroll+5512-C@corp.example", "pl-payroll+5512-c@corp.example", "corp.example"),
    # source routes are dropped (RFC 5321 4.1.2, C)
    ("<@relay.example:u@corp.example>", "u@corp.example", "u@corp.example", "corp.example"),
    ("<@a.example,@b.example:u@corp.example>", "u@corp.example", "u@corp.example", "corp.example"),
    ("<@[10.0.0.1]:u@corp.example>", "u@corp.example", "u@corp.example", "corp.example"),
    # open-relay tricks: the relay judges the hidden hop
    ("<user%evil.example@corp.example>", "user%evil.example@corp.example", "user%evil.example@corp.example", "evil.example"),
    ("<user%a.example%evil.example@corp.example>", "user%a.example%evil.example@corp.example",
     "user%a.example%evil.example@corp.example", "evil.example"),
    ("<user%corp.example@corp.example>", "user%corp.example@corp.example", "user%corp.example@corp.example", "corp.example"),
    ("<evil.example!user@corp.example>", "evil.example!user@corp.example", "evil.example!user@corp.example", "evil.example"),
    ('<"a@evil.example"@corp.example>', '"a@evil.example"@corp.example', '"a@evil.example"@corp.example', "evil.example"),
    ('<"user%Evil.Example"@corp.example>', "user%Evil.Example@corp.example", "user%evil.example@corp.example",
     "evil.example"),
    ('<"a@[1.2.3.4]"@corp.example>', '"a@[1.2.3.4]"@corp.example', '"a@[1.2.3.4]"@corp.example', "[1.2.3.4]"),
    ("<a%-Bad-@corp.example>", "a%-Bad-@corp.example", "a%-bad-@corp.example", "-bad-"),
    # quoted local parts: unquoted when they need no quotes
    ('<"abc"@corp.example>', "abc@corp.example", "abc@corp.example", "corp.example"),
    ('<"a b"@corp.example>', '"a b"@corp.example', '"a b"@corp.example', "corp.example"),
    ('<"a\\"b"@corp.example>', '"a\\"b"@corp.example', '"a\\"b"@corp.example', "corp.example"),
    ('<"a+b"@corp.example>', "a+b@corp.example", "a+b@corp.example", "corp.example"),
    ('<""@corp.example>', '""@corp.example', '""@corp.example', "corp.example"),
    # IDNA: U-label and A-label are one domain; SMTPUTF8 local parts
    ("<a@bücher.example>", "a@bücher.example", "a@xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("<a@BÜCHER.example>", "a@BÜCHER.example", "a@xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("<a@XN--BCHER-KVA.example>", "a@XN--BCHER-KVA.example", "a@xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("<Jürgen@corp.example>", "Jürgen@corp.example", "jürgen@corp.example", "corp.example"),
    # address literals
    ("<a@[192.0.2.1]>", "a@[192.0.2.1]", "a@[192.0.2.1]", "[192.0.2.1]"),
    ("<a@[IPv6:2001:DB8::1]>", "a@[IPv6:2001:DB8::1]", "a@[ipv6:2001:db8::1]", "[ipv6:2001:db8::1]"),
    # RFC 5321 4.5.1: <Postmaster> without a domain
    ("<Postmaster>", "Postmaster", "postmaster", ""),
    ("<a_b@host_name.example>", "a_b@host_name.example", "a_b@host_name.example", "host_name.example"),
]


@pytest.mark.parametrize(("text", "formatted", "canonical", "relay_domain"), VALID_PATHS)
def test_parse_path_valid(text: str, formatted: str, canonical: str, relay_domain: str) -> None:
    address = parse_path(text)
    assert address is not None
    assert str(address) == formatted
    assert address.canonical == canonical
    assert address.relay_domain == relay_domain
    assert parse_path(str(address)) == address


@pytest.mark.parametrize("text", ["<>", ""])
def test_null_path(text: str) -> None:
    assert parse_path(text) is None


CVE_2023_27043 = [f"alice@example.org{sep}<bob@example.com>" for sep in '()<>[]@;:."'] + [
    "alice@example.org)<bob@example.com>>",
    "alice@example.org)(<bob@example.com>",
    "alice@example.org) <bob@example.com>",
    "alice@example.org <bob@example.com>",
    'a@b"c"<d@e>',
    "a@b.com@c.com",
]

INVALID_PATHS = [
    "<a@b",
    "a@b>",
    "<",
    "<<a@b>>",
    "<(x)a@b>",  # comments have no place in an SMTP path
    "<a@b (x)>",
    "< a@b>",
    "<a b@c>",
    "user@d@host",
    "<a!b>",  # a bang path with no domain
    "<localpart>",
    "<@a.example:>",
    "<@:a@b>",
    "<@a.example,b@c>",
    "<@-bad.example:a@b>",
    "<a..b@c>",
    "<.a@c>",
    "<a.@c>",
    "<a@-x.example>",
    "<a@x..example>",
    "<a@x.example.>",
    "<a@>",
    "<@b>",
    "<a@b\x00>",
    "<a\x00@b>",
    "<a@b\r\n>",
    "<a\r\n@b>",
    "<a\n@b>",
    '<"a\x00"@b>',
    '<"a@b>',
    "<a@[1.2.3]>",
    "<a@[300.1.1.1]>",
    "<a@[IPv6:zz]>",
    "<a@[x:y]>",
    "<a@[1.2.3.4>",
    "<a@[1.[2]>",
    "<a@xn--zz>",  # not a valid A-label
    "<a@xn--bcher-kva-.example>",
    "<a@xn--Bcher-kva.example.>",
    "<a@bad\u200b.example>",
    "<a@ｃorp.example>",
    "<a\\b@c>",
    "<a]b@c>",
    "<a)b@c>",
    "<" + "x" * 65 + "@corp.example>",
    "<" + "x" * 60 + "@" + ".".join(["d" * 60] * 4) + ">",
    "<a@" + "d" * 64 + ".example>",
    "<a@" + ".".join(["d" * 50] * 6) + ">",
    "a@",
    "<alice@example.org)<bob@example.com>>",
    '<"a@evil"@x.example\x01>',
    '<"a\x7fb"@x.example>',
    *[f"<{t}>" for t in CVE_2023_27043],
    *CVE_2023_27043,
]


@pytest.mark.parametrize("text", INVALID_PATHS)
def test_parse_path_invalid(text: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text)


def test_local_part_limit_is_64_octets_not_characters() -> None:
    assert parse_path("<" + "x" * 64 + "@corp.example>") is not None
    with pytest.raises(AddressError):
        parse_path("<" + "ü" * 33 + "@corp.example>")  # 66 octets


@pytest.mark.parametrize("text", CVE_2023_27043)
def test_cve_2023_27043_refused_in_headers(text: str) -> None:
    with pytest.raises(AddressError):
        parse_address_list(text)
    # Leniently, nothing is made of the malformed element: neither alice nor bob.
    assert parse_address_list(text, strict=False) == []


# header value, the addr-specs found
VALID_LISTS = [
    ("a@b", ["a@b"]),
    ("a@b, c@d", ["a@b", "c@d"]),
    ("a@b,,c@d,", ["a@b", "c@d"]),
    ("Alice <a@b>", ["a@b"]),
    ('"Smith, John" <a@b>, c@d', ["a@b", "c@d"]),
    ('"Smith; John: <x@y>" <a@b>', ["a@b"]),
    ("=?utf-8?q?Smith=2C_John?= <a@b>", ["a@b"]),
    ("=?utf-8?q?Evil=0D=0ABcc=3A_x=40y?= <a@b>", ["a@b"]),
    ("=?utf-8?b?U21pdGgsIEpvaG4=?= <a@b>, c@d", ["a@b", "c@d"]),
    ("John Q. Public <jqp@example.com>", ["jqp@example.com"]),
    ("Jürgen Müller <jm@example.com>", ["jm@example.com"]),
    ("(x)a@b", ["a@b"]),
    ("<(x)a@b>", ["a@b"]),
    ("a@b (Alice)", ["a@b"]),
    ("a@b (nested (comment) here), c@d", ["a@b", "c@d"]),
    ("Alice <a@b> (work)", ["a@b"]),
    ("<a@b>", ["a@b"]),
    ("undisclosed-recipients:;", []),
    ("undisclosed-recipients: ;", []),
    ("team: a@x, b@y;", ["a@x", "b@y"]),
    ("team: a@x, b@y;, c@z", ["a@x", "b@y", "c@z"]),
    ("team: Alice <a@x>, ,b@y; , Carol <c@z>", ["a@x", "b@y", "c@z"]),
    ('"a@evil"@ok', ['"a@evil"@ok']),
    ("<@route.example:a@b>", ["a@b"]),
    ("<@r1.example,@r2.example:a@b>", ["a@b"]),
    ("a@b,\r\n c@d", ["a@b", "c@d"]),
    ("Alice\r\n <a@b>", ["a@b"]),
    ("a@[192.0.2.1]", ["a@[192.0.2.1]"]),
    ('"" <a@b>', ["a@b"]),
]


@pytest.mark.parametrize(("value", "expected"), VALID_LISTS)
def test_parse_address_list(value: str, expected: list[str]) -> None:
    assert [str(a) for a in parse_address_list(value)] == expected
    assert [str(a) for a in parse_address_list(value, strict=False)] == expected


# header value, what a lenient parse still finds
MALFORMED_LISTS = [
    ("a@b, bad@, c@d", ["a@b", "c@d"]),
    ("a@b c@d, e@f", ["e@f"]),
    ("a@b <c@d>, e@f", ["e@f"]),
    ("Alice <a@b> junk, e@f", ["e@f"]),
    ("Alice <a@b, e@f", []),
    ("Alice <>, e@f", ["e@f"]),
    ("Alice <a@b>>, e@f", ["e@f"]),
    ("<@r.example a@b>, e@f", ["e@f"]),
    ("a @b, e@f", ["e@f"]),
    ("a@ b, e@f", ["e@f"]),
    ("a@b;, e@f", ["e@f"]),
    ("team: a@x, b@y", ["b@y"]),
    ("alice@example.org,<bob@example.com", ["alice@example.org"]),
    ("team: a@x, bad, b@y;", ["a@x", "b@y"]),
    ("team: a@x; junk, e@f", ["e@f"]),
    ("outer: inner: a@x;;, e@f", ["e@f"]),
    (": a@x;, e@f", ["e@f"]),
    ("a@bad..domain, e@f", ["e@f"]),
    ("a@xn--zz, e@f", ["e@f"]),
    ('"a\r\n b"@x, e@f', ["e@f"]),
    ("Alice <a@b> (unterminated", []),
    ('"unterminated <a@b>', []),
    ("a@b\x00, e@f", []),
    ("a@b)", []),
    ('a@b, "unterminated\\', []),
    ("a@b (unterminated\\", []),
    ("a@b (control \x01)", []),
    ("a@xn--abc-9ja.example, e@f", ["e@f"]),
    ("just words", []),
]


@pytest.mark.parametrize(("value", "expected"), MALFORMED_LISTS)
def test_parse_address_list_malformed(value: str, expected: list[str]) -> None:
    with pytest.raises(AddressError):
        parse_address_list(value)
    assert [str(a) for a in parse_address_list(value, strict=False)] == expected


def test_locate_addresses_gives_offsets_of_the_addr_spec() -> None:
    value = '"Smith, J" <Pl-Payroll@corp.example> (x), team: b@y;'
    located = locate_addresses(value)
    assert [value[m.start : m.end] for m in located] == ["Pl-Payroll@corp.example", "b@y"]
    assert located[0].address.canonical == "pl-payroll@corp.example"


def test_locate_addresses_skips_what_does_not_decode() -> None:
    def decode(text: str) -> str:
        return text.encode("latin-1").decode("utf-8")

    value = "a\xff@b, c@d"
    assert [str(m.address) for m in locate_addresses(value, decode)] == ["c@d"]


def test_a_run_of_atext_or_white_space_is_one_token() -> None:
    local = "a.Z9!#$%&'*+-/=?^_`{|}~\x80ü\U0010ffff\udcff"
    value = f"{local}@x.example \t\r\n, c@d"
    located = locate_addresses(value)
    assert [(m.address, m.start, m.end) for m in located] == [
        (Address(local, "x.example"), 0, len(local) + 10),
        (Address("c", "d"), len(value) - 3, len(value)),
    ]


def test_kept_parses_give_a_new_list_each_time() -> None:
    value = "Team B <pl-payroll@corp.example>, client@supplier.example"
    first = locate_addresses(value)
    first.clear()
    assert [str(m.address) for m in locate_addresses(value)] == ["pl-payroll@corp.example", "client@supplier.example"]
    lenient = parse_address_list(value, strict=False)
    lenient.append(Address("x", "y"))
    assert parse_address_list(value, strict=False) == [Address("pl-payroll", "corp.example"),
                                                       Address("client", "supplier.example")]
    assert parse_path("<pl-payroll@corp.example>") == parse_path("<pl-payroll@corp.example>") == Address(
        "pl-payroll", "corp.example")


def test_a_refused_text_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(AddressError):
            parse_path("<a b@c>")
        assert locate_addresses("a@b, (") == []


def test_long_texts_parse_like_short_ones() -> None:
    # Over 1024 characters a text is parsed each time and never kept: the same answers.
    many = ", ".join(f"User {i} <u{i}@corp.example>" for i in range(60))
    assert len(many) > 1024
    located = locate_addresses(many)
    assert [str(m.address) for m in located] == [f"u{i}@corp.example" for i in range(60)]
    assert [many[m.start : m.end] for m in located] == [f"u{i}@corp.example" for i in range(60)]
    assert locate_addresses(many) == located
    route = ",".join(["@relay.corp.example"] * 60)
    assert len(route) > 1024
    assert parse_path(f"<{route}:u@corp.example>") == Address("u", "corp.example")
    with pytest.raises(AddressError):
        parse_path(f"<{'a' * 1100}@corp.example>")


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("corp.example", "corp.example"),
        ("CORP.Example", "corp.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.EXAMPLE", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("localhost", "localhost"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:db8:0::1]", "[ipv6:2001:db8::1]"),
        ("münchen.de", "xn--mnchen-3ya.de"),
    ],
)
def test_normalize_domain(domain: str, expected: str) -> None:
    assert normalize_domain(domain) == expected


@pytest.mark.parametrize(
    "domain",
    ["", ".", "a..b", "-a.example", "a-.example", "a b", "xn--zz", "[1.2.3.4", "[]", "[ipv6:1.2.3.4.5]", "\u200b.example", "ｃorp.example",
     "a" * 64 + ".example", ".".join(["a" * 60] * 5), "ü" * 1000],
)
def test_normalize_domain_invalid(domain: str) -> None:
    with pytest.raises(AddressError):
        normalize_domain(domain)


def test_u_label_and_a_label_are_the_same_mailbox() -> None:
    assert Address("Pay", "Bücher.example").canonical == Address("pay", "xn--bcher-kva.EXAMPLE").canonical


@pytest.mark.parametrize(
    ("local", "separator", "expected"),
    [
        ("uk-payroll+101203-T", "+", ("uk-payroll", "101203-T")),
        ("a+b+c", "+", ("a", "b+c")),
        ("a+", "+", ("a", "")),
        ("plain", "+", ("plain", None)),
        ("+tag", "+", ("+tag", None)),
        ("", "+", ("", None)),
        ("postmaster", "+", ("postmaster", None)),
        ("mailer-daemon", "-", ("mailer-daemon", None)),
        ("MAILER-DAEMON", "-", ("MAILER-DAEMON", None)),
        ("PostMaster", "t", ("PostMaster", None)),
        ("pl-payroll--77-A", "--", ("pl-payroll", "77-A")),
        ("pl-payroll", "-", ("pl", "payroll")),
        ("a@b+c", "+", ("a@b", "c")),
    ],
)
def test_split_tag(local: str, separator: str, expected: tuple[str, str | None]) -> None:
    assert split_tag(local, separator) == expected


def test_split_tag_of_a_quoted_local_part_splits_the_unquoted_value() -> None:
    address = parse_path('<"pl-payroll+5512-C"@corp.example>')
    assert address is not None
    assert split_tag(address.local, "+") == ("pl-payroll", "5512-C")


@pytest.mark.parametrize(
    ("base", "tag", "expected"),
    [
        ("pl-payroll", "900001-T", "pl-payroll+900001-T"),
        ("x" * 55, "900001-T", "x" * 55 + "+900001-T"),
        ("x" * 56, "900001-T", None),
        ("ü" * 27, "900001-T", "ü" * 27 + "+900001-T"),
        ("ü" * 28, "900001-T", None),
    ],
)
def test_join_tag(base: str, tag: str, expected: str | None) -> None:
    assert join_tag(base, tag, "+") == expected


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (Address("a", "b"), "a@b"),
        (Address("a b", "b"), '"a b"@b'),
        (Address('a"b\\c', "b"), '"a\\"b\\\\c"@b'),
        (Address("a..b", "b"), '"a..b"@b'),
        (Address(".a", "b"), '".a"@b'),
        (Address("", "b"), '""@b'),
        (Address("a@evil", "ok"), '"a@evil"@ok'),
        (Address("postmaster", ""), "postmaster"),
    ],
)
def test_format(address: Address, expected: str) -> None:
    assert str(address) == expected
    if address.domain:
        assert parse_path(f"<{expected}>") == address


def test_route_domains_follow_every_hop() -> None:
    address = parse_path("<a%corp.example%evil.example@corp.example>")
    assert address is not None
    assert address.route_domains == ("corp.example", "evil.example", "corp.example")
    assert address.relay_domain == "evil.example"
    assert Address("a", "").route_domains == ("",)


def test_route_hops_are_bounded() -> None:
    address = Address("a" + "%x" * 100, "corp.example")
    assert len(address.route_domains) == 33


# --- properties -------------------------------------------------------------

_atext = st.sampled_from(list("abcXYZ019!#$%&'*+-/=?^_`{|}~") + ["ü", "é"])
_dot_atom = st.lists(st.text(_atext, min_size=1, max_size=8), min_size=1, max_size=3).map(".".join)
_qcontent = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
_local = st.one_of(_dot_atom, _qcontent)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(lambda s: s[2:4] != "--")
_domain = st.one_of(
    st.lists(_label, min_size=1, max_size=4).map(".".join),
    st.sampled_from(["bücher.example", "Corp.Example", "[192.0.2.7]", "[IPv6:2001:db8::2]", "münchen.de"]),
)


@given(_local, _domain)
def test_format_then_parse_gives_the_same_address(local: str, domain: str) -> None:
    address = Address(local, domain)
    assert parse_path(f"<{address}>") == address
    assert parse_address_list(f"Name <{address}>") == [address]
    assert parse_address_list(str(address)) == [address]


_tricky = st.text(st.sampled_from(list('ab.@<>()"\\,;:[] %!+\r\n\t') + ["ü"]), max_size=24)


@given(_tricky)
def test_parse_then_format_is_stable(text: str) -> None:
    for parse in (lambda t: [parse_path(t)], parse_address_list, lambda t: parse_address_list(t, strict=False)):
        try:
            addresses = parse(text)
        except AddressError:
            continue
        for address in addresses:
            if address is not None:
                assert parse_path(f"<{address}>") == address
                assert str(parse_path(f"<{address}>")) == str(address)
