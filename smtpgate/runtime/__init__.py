"""Wiring from config: listeners, signals, sd_notify, reload (the composition root)."""
