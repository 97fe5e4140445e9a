"""Helpers: EMA, image utilities, checkpoint import."""
