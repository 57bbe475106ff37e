"""Test support for smtpgate: an upstream SMTP sink and private Postfix instances."""
