"""Fuzz smtpgate's address parsers: no input may crash them or break parse/format stability.

Run: .venv/bin/python tests/fuzz/fuzz_addresses.py -max_total_time=60
"""

import sys

import atheris

with atheris.instrument_imports():
    from smtpgate.mail.addresses import AddressError, locate_addresses, parse_address_list, parse_path, split_tag


def check_stable(address, envelope: bool) -> None:
    if envelope:
        again = parse_path(f"<{address}>") if address.domain else address
    else:
        [again] = parse_address_list(str(address))
    assert again == address, (address, again)
    address.canonical  # noqa: B018 - must not raise for a parsed address
    address.relay_domain  # noqa: B018
    split_tag(address.local, "+")


def test_one_input(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(512)
    try:
        address = parse_path(text)
    except AddressError:
        pass
    else:
        if address is not None:
            assert "\r" not in str(address) and "\n" not in str(address) and "\x00" not in str(address)
            check_stable(address, envelope=True)
    try:
        strict = parse_address_list(text)
    except AddressError:
        strict = None
    lenient = [m for m in locate_addresses(text)]
    for located in lenient:
        span = text[located.start : located.end]
        assert "\r" not in span and "\n" not in span, span
        check_stable(located.address, envelope=False)
    if strict is not None:
        assert strict == [m.address for m in lenient]


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
