"""The admin HTTP side: health, metrics, the linked-activities API and pages."""

from smtpgate.admin.app import AdminServer, Sources

__all__ = ["AdminServer", "Sources"]
