"""Pure mail handling: addresses, the header block, SMTP parameters, the data guard,
the reply catalogue, Message-IDs and header splicing. No I/O (docs/architecture.md)."""
