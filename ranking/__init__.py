"""Ranking: training-set construction, shared feature assembly, LightGBM and DNN rankers."""
