"""MAIL and RCPT arguments without a socket (smtpgate/mail/params.py): the path split from
the parameters, each parameter's syntax and value, the SIZE declared upstream, xtext.

The replies a client hears for these are shown once each on the wire in
tests/frontends/smtp/test_relay.py (test_bad_mail_commands, test_bad_rcpt_commands).
"""

from __future__ import annotations

import pytest

from smtpgate.frontends.smtp.relay import MAIL_PARAMS, RCPT_PARAMS
from smtpgate.mail import replies
from smtpgate.mail.params import SIZE_MARGIN, Param, parse_params, split_argument, upstream_size, xtext
from smtpgate.mail.replies import SMTPReply


@pytest.mark.parametrize(("arg", "keyword", "expected"), [
    ("FROM:<a@corp.example>", "FROM:", ("<a@corp.example>", [])),
    ("from:<a@corp.example> SIZE=10  BODY=8BITMIME", "FROM:", ("<a@corp.example>", ["SIZE=10", "BODY=8BITMIME"])),
    ("FROM: <a@corp.example>", "FROM:", ("<a@corp.example>", [])),  # a space after the colon is tolerated
    ("FROM:<>", "FROM:", ("<>", [])),
    ("TO:<b@x.example> NOTIFY=NEVER", "TO:", ("<b@x.example>", ["NOTIFY=NEVER"])),
    # The closing bracket is looked for outside quoted strings.
    ('TO:<"a> b"@x.example> NOTIFY=NEVER', "TO:", ('<"a> b"@x.example>', ["NOTIFY=NEVER"])),
    ('TO:<"a\\"> b"@x.example>', "TO:", ('<"a\\"> b"@x.example>', [])),
    # No brackets: the path ends at the first space (parse_path refuses it later).
    ("FROM:a@ SIZE=1", "FROM:", ("a@", ["SIZE=1"])),
])
def test_split_argument(arg: str, keyword: str, expected: tuple[str, list[str]]) -> None:
    assert split_argument(arg, keyword) == expected


@pytest.mark.parametrize(("arg", "keyword"), [
    (None, "FROM:"),  # MAIL alone
    ("TO:<a@corp.example>", "FROM:"),  # MAIL TO:
    ("FROM:", "FROM:"),
    ("FROM:   ", "FROM:"),
    ("TO:<@a.example:b@x.example", "TO:"),  # never closed
    ('TO:<"b>@x.example', "TO:"),  # closed only inside the quotes
    ("FROM:<a@corp.example>SIZE=1", "FROM:"),  # a parameter glued to the path
])
def test_split_argument_refuses(arg: str | None, keyword: str) -> None:
    assert split_argument(arg, keyword) is None


def test_parameters_keep_the_value_as_written_and_uppercase_the_keyword() -> None:
    params = parse_params(["size=100", "Ret=hdrs", "ENVID=QQ+2B314159", "smtputf8", "AUTH=<>"], MAIL_PARAMS)
    assert list(params) == ["SIZE", "RET", "ENVID", "SMTPUTF8", "AUTH"]
    assert params["RET"] == Param("RET", "hdrs") and str(params["RET"]) == "RET=hdrs"
    assert params["SMTPUTF8"].value is None and str(params["SMTPUTF8"]) == "SMTPUTF8"
    rcpt = parse_params(["NOTIFY=success,Failure", "ORCPT=rfc822;Payroll@corp.example"], RCPT_PARAMS)
    assert [str(p) for p in rcpt.values()] == ["NOTIFY=success,Failure", "ORCPT=rfc822;Payroll@corp.example"]


@pytest.mark.parametrize("words", [
    [], ["SIZE=0"], ["SIZE=" + "9" * 20], ["BODY=7BIT"], ["BODY=8bitmime"], ["RET=FULL"], ["ENVID=" + "x" * 100],
    ["AUTH=<>"], ["AUTH=jane+40corp.example"], ["SMTPUTF8"], ["ENVID=a+2Bb"],
])
def test_good_mail_parameters(words: list[str]) -> None:
    assert len(parse_params(words, MAIL_PARAMS)) == len(words)


@pytest.mark.parametrize("words", [
    ["NOTIFY=NEVER"], ["NOTIFY=SUCCESS,FAILURE,DELAY"], ["NOTIFY=delay"], ["ORCPT=rfc822;b@x.example"],
    ["ORCPT=utf-8;b@x.example"], ["NOTIFY=FAILURE", "ORCPT=rfc822;b@x.example"],
])
def test_good_rcpt_parameters(words: list[str]) -> None:
    assert len(parse_params(words, RCPT_PARAMS)) == len(words)


# 555 5.5.4: a parameter smtpgate does not take where it was given.
@pytest.mark.parametrize(("words", "allowed"), [
    (["FOO=bar"], MAIL_PARAMS),
    (["NOTIFY=SUCCESS"], MAIL_PARAMS),  # a RCPT parameter on MAIL
    (["RET=FULL"], RCPT_PARAMS),  # a MAIL parameter on RCPT
    (["XYZZY"], RCPT_PARAMS),
    (["BODY=BINARYMIME"], MAIL_PARAMS),  # needs CHUNKING, which is not offered
])
def test_parameter_not_taken_is_555(words: list[str], allowed: set[str]) -> None:
    with pytest.raises(SMTPReply) as refused:
        parse_params(words, allowed)
    assert refused.value.reply == replies.BAD_PARAMETER


# 501 5.5.4: a parameter badly written, or a value it cannot have.
@pytest.mark.parametrize(("words", "allowed"), [
    (["=1"], MAIL_PARAMS),
    (["-SIZE=1"], MAIL_PARAMS),
    (["SIZE=1 2"], MAIL_PARAMS),
    (["AUTH=a=b"], MAIL_PARAMS),  # esmtp-value has no "=" (RFC 5321 4.1.2)
    (["AUTH=a\x01"], MAIL_PARAMS),
    (["SIZE=1", "size=2"], MAIL_PARAMS),  # given twice
    (["SIZE"], MAIL_PARAMS),
    (["SIZE="], MAIL_PARAMS),
    (["SIZE=-1"], MAIL_PARAMS),
    (["SIZE=" + "9" * 21], MAIL_PARAMS),
    (["BODY=9BIT"], MAIL_PARAMS),
    (["BODY"], MAIL_PARAMS),
    (["SMTPUTF8=yes"], MAIL_PARAMS),
    (["RET=NONE"], MAIL_PARAMS),
    (["RET"], MAIL_PARAMS),
    (["ENVID"], MAIL_PARAMS),
    (["ENVID=" + "x" * 101], MAIL_PARAMS),
    (["ENVID=a+2b"], MAIL_PARAMS),  # xtext hex digits are uppercase
    (["ENVID=a+"], MAIL_PARAMS),
    (["AUTH"], MAIL_PARAMS),
    (["NOTIFY=SOMETIMES"], RCPT_PARAMS),
    (["NOTIFY=NEVER,SUCCESS"], RCPT_PARAMS),  # NEVER stands alone
    (["NOTIFY=SUCCESS,SUCCESS"], RCPT_PARAMS),
    (["NOTIFY="], RCPT_PARAMS),
    (["NOTIFY"], RCPT_PARAMS),
    (["ORCPT=b@x.example"], RCPT_PARAMS),  # no addr-type
    (["ORCPT=rfc822;"], RCPT_PARAMS),
    (["ORCPT=;b@x.example"], RCPT_PARAMS),
    (["ORCPT=rfc 822;b@x.example"], RCPT_PARAMS),
])
def test_bad_parameter_is_501(words: list[str], allowed: set[str]) -> None:
    with pytest.raises(SMTPReply) as refused:
        parse_params(words, allowed)
    assert refused.value.reply == replies.BAD_SYNTAX


@pytest.mark.parametrize("declared,limit,sent", [
    (100, None, 100 + SIZE_MARGIN),  # room for the Received field and the tags
    (100, 100 + SIZE_MARGIN + 1, 100 + SIZE_MARGIN),
    (100, 150, 150),  # the room never takes a message that fits over the upstream's limit
    (150, 150, 150),
    (200, 150, 200 + SIZE_MARGIN),  # over it anyway: the upstream's own 552 at MAIL
    (0, 0, SIZE_MARGIN),  # SIZE 0 from the upstream: no limit (RFC 1870 4)
])
def test_upstream_size_leaves_room_for_what_smtpgate_adds(declared, limit, sent):
    assert upstream_size(declared, limit) == sent


@pytest.mark.parametrize(("text", "encoded"), [
    ("pl-payroll@corp.example", "pl-payroll@corp.example"),
    ("a+b=c@x.example", "a+2Bb+3Dc@x.example"),
    ("a b@x.example", "a+20b@x.example"),
    ("zoë@x.example", "zo+C3+AB@x.example"),
    ("a\x7f@x", "a+7F@x"),
])
def test_xtext(text: str, encoded: str) -> None:
    assert xtext(text) == encoded
