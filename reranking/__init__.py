"""Rule-based re-ranking with per-rule explanations."""
