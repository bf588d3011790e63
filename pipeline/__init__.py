"""The funnel: the Pipeline, its bundle (training, manifest, loading), the live recommender with its
online state, the feedback log and experiment assignment. Plain Python, no web framework: the HTTP
service, the offline evaluator and the A/B simulator all run it.
"""
