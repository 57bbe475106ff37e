"""The milter front end: smtpgate inside an existing Postfix (smtpd_milters), protocol version 6."""
