"""The local stand-in for a Databricks workspace's Model Serving and Jobs APIs, which the real
databricks-sdk drives over HTTP: :mod:`.api` (REST shapes), :mod:`.serving` (what an endpoint
serves), :mod:`.endpoints` (the endpoints' state machine and persistence), :mod:`.jobs` (the Jobs
API over a bundle's jobs and the local runner), :mod:`.app` (the HTTP app) and :mod:`.process`
(a workspace process)."""
