"""Helpers for tests that drive the web page with a real browser."""
