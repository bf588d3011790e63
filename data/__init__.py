"""Data layer: schemas, loaders, the synthetic world, splits and negative sampling (polars)."""
