"""Placeholder: implemented by its own issue (see the tracker)."""
