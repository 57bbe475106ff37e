"""A listener's TLS context as `server_context` builds it (smtpgate/frontends/smtp/tls.py):
the options it adds to Python's, and what a TlsSetupError says for each setting."""

from __future__ import annotations

import ssl

import pytest

from smtpgate.frontends.smtp.tls import TlsSetupError, _set_groups_list, server_context
from tests.support.sink import make_test_cert


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_test_cert(tmp_path_factory.mktemp("tls"))


def test_a_server_context_with_python_s_options_and_three_more(pair):
    context = server_context(*pair)
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    python_s = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).options
    added = ssl.OP_NO_COMPRESSION | ssl.OP_SINGLE_ECDH_USE | ssl.OP_NO_TICKET
    assert context.options == python_s | added
    assert context.verify_mode == ssl.CERT_NONE
    assert server_context(*pair, client_ca=pair[0]).verify_mode == ssl.CERT_OPTIONAL


def test_each_setting_that_cannot_be_applied_is_named(pair, tmp_path):
    with pytest.raises(TlsSetupError) as bad_ciphers:
        server_context(*pair, ciphers="NO-SUCH-SUITE")
    assert str(bad_ciphers.value) == "tls_ciphers: OpenSSL selects no cipher suite from 'NO-SUCH-SUITE'"
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsSetupError) as bad_pair:
        server_context(missing, pair[1])
    assert str(bad_pair.value).startswith(f"tls_cert/tls_key {missing}: ")
    with pytest.raises(TlsSetupError) as bad_ca:
        server_context(*pair, client_ca=missing)
    assert str(bad_ca.value).startswith(f"tls_client_ca {missing}: ")


@pytest.mark.skipif(hasattr(ssl.SSLContext, "set_groups"), reason="Python sets the groups itself")
def test_the_groups_list_reaches_this_python_s_libssl():
    # Before Python 3.15 the list goes to the context's SSL_CTX through ctypes: on this
    # CPython that works (True), and a list OpenSSL does not know is refused (False).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert _set_groups_list(context, "X25519:prime256v1") is True
    assert _set_groups_list(context, "no-such-group") is False
