"""smtpgate relies on a few aiosmtpd internals (smtpgate/frontends/smtp/aiosmtpd_glue.py):
this fails loudly, naming each one, when an aiosmtpd release changes them."""

from smtpgate.frontends.smtp.aiosmtpd_glue import check_internals


def test_the_aiosmtpd_internals_smtpgate_uses_are_there():
    assert check_internals() == []
