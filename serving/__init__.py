"""Serving: the Pipeline, bundle loading, feedback log and online state, FastAPI app."""
