"""The TLS client certificate smtpgate shows the upstream (upstream.tls_client_cert)."""

from __future__ import annotations

import ssl
from pathlib import Path

from smtpgate.config.checks import refuse_passphrase


def load_client_certificate(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load a TLS client certificate and its key into context; raises ValueError (an
    encrypted key: no passphrase is ever asked for), OSError or ssl.SSLError."""
    context.load_cert_chain(str(cert), str(key), password=refuse_passphrase)
