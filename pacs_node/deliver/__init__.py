"""Delivering derived series to destinations."""
