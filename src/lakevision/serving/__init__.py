"""Serving: the packaged model, the SDK client, endpoints (ModelServer), the deployment pipeline
and the local stand-in for the workspace's serving REST API."""
