"""The upstream side: SMTP client sessions and their pool, the Maildir sink, mx: resolution."""
