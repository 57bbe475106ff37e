"""smtpgate relies on a few aiosmtpd internals (smtpgate/frontends/smtp/aiosmtpd_glue.py):
this fails loudly, naming each one, when an aiosmtpd release changes them."""

from smtpgate.frontends.smtp.aiosmtpd_glue import check_internals


def test_the_aiosmtpd_internals_smtpgate_uses_are_there():
    assert check_internals() == []


def test_a_changed_aiosmtpd_is_named_member_by_member(monkeypatch):
    from aiosmtpd.smtp import SMTP

    monkeypatch.delattr(SMTP, "_reset_timeout")
    monkeypatch.setattr(SMTP, "check_helo_needed", lambda self, helo: None)  # no longer a coroutine
    monkeypatch.setattr(SMTP, "_set_rset_state", "not a function")
    assert check_internals() == [
        "aiosmtpd.smtp.SMTP._set_rset_state is no longer callable",
        "aiosmtpd.smtp.SMTP._reset_timeout is gone",
        "aiosmtpd.smtp.SMTP.check_helo_needed is no longer a coroutine function",
    ]


def test_an_auth_mechanism_record_that_is_no_longer_a_named_tuple_is_named(monkeypatch):
    from aiosmtpd.smtp import _AuthMechAttr

    monkeypatch.delattr(_AuthMechAttr, "_fields")
    assert check_internals() == ["aiosmtpd.smtp._AuthMechAttr no longer has a method field"]


def test_a_stream_reader_that_keeps_the_limit_it_was_made_with_is_named(monkeypatch):
    import asyncio

    class FixedLimit(asyncio.StreamReader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.made_with = self._limit

        async def readuntil(self, separator=b"\n"):
            self._limit = self.made_with
            return await super().readuntil(separator)

    monkeypatch.setattr(asyncio, "StreamReader", FixedLimit)
    assert check_internals() == ["asyncio.StreamReader.readuntil no longer obeys a changed _limit"]
