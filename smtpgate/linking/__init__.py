"""The link decision: pure references, source finding, plan and header edits, and the
LinkService that runs it against the store (docs/architecture.md)."""
