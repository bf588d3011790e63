"""Offline evaluation: metrics, protocols, baselines, bootstrap intervals, segments, reports."""
