"""smtpgate: an SMTP relay that links work-management activities across team mailboxes."""

__version__ = "0.1.0"
