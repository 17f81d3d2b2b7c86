"""Watching what is deployed: endpoint health now; drift and retrain triggers build on it."""
