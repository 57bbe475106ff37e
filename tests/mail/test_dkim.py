"""Which DKIM signatures a header edit breaks (smtpgate/mail/dkim.py)."""

from smtpgate.mail.dkim import broken_signatures
from smtpgate.mail.headers import parse_header_block

SIGNED = (b"DKIM-Signature: v=1; a=rsa-sha256; d=corp.example; s=s1;\r\n"
          b"\th=From : To:Cc:\r\n\t Subject; bh=abc=; b=xyz\r\n"
          b"DKIM-Signature: v=1; d=other.example; h=subject:date; b=q\r\n"
          b"DKIM-Signature: garbage without tags\r\n"
          b"Cc: pl-payroll@corp.example\r\n\r\nbody\r\n")


def test_a_signature_covering_an_edited_field_is_named_with_its_domain():
    headers = parse_header_block(SIGNED)
    assert broken_signatures(headers, {"cc"}) == [("corp.example", ["cc"])]
    assert broken_signatures(headers, {"cc", "from"}) == [("corp.example", ["cc", "from"])]
    assert broken_signatures(headers, {"reply-to"}) == []
    assert broken_signatures(parse_header_block(b"Cc: a@b\r\n\r\n"), {"cc"}) == []
