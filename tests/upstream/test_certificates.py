"""The upstream's client certificate (smtpgate/upstream/certificates.py): a key
under a passphrase is refused with a reason, never asked for on a terminal."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from smtpgate.upstream.certificates import load_client_certificate
from tests.support.pki import client_certs  # noqa: F401 - fixture


def test_an_encrypted_key_is_refused_with_the_reason(client_certs):  # noqa: F811
    context = ssl.create_default_context()
    with pytest.raises(ValueError, match="^the private key is encrypted; smtpgate needs an unencrypted key file"):
        load_client_certificate(context, Path(client_certs["cert"]), Path(client_certs["encrypted_key"]))
    load_client_certificate(context, Path(client_certs["cert"]), Path(client_certs["key"]))
