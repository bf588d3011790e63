"""Evaluation: metrics, offline reports, baselines, A/B simulation and statistics."""
