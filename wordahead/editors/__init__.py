"""editors: the language server editors talk to, and what a buffer means for it."""
