"""Routing: what becomes of a series, from its header and who sent it (pure, no I/O)."""
