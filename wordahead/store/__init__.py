"""store: what the user typed, kept privately in SQLite (redacted)."""
