"""Multi-stage retrieval: candidate sources, two-tower model, ANN index."""
