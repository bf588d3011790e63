"""Serving over HTTP: the FastAPI app and its routes, request batching, the explorer page."""
