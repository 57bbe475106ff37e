"""The SMTP front end: aiosmtpd glue and the lockstep relay session."""
