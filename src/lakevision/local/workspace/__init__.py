"""The local stand-in for a Databricks workspace's Model Serving API, which the real databricks-sdk
drives over HTTP: :mod:`.api` (REST shapes), :mod:`.serving` (what an endpoint serves),
:mod:`.endpoints` (the endpoints' state machine and persistence), :mod:`.app` (the HTTP app) and
:mod:`.process` (a workspace process)."""
