"""Untrusted entries: the entry folder, its claims, re-measurement, submit."""
