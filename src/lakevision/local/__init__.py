"""The stand-ins for Databricks on a laptop: Sail for the cluster's Spark, the workspace's Model
Serving API, the bundle validator and the job runner. Production code never imports this package;
:mod:`lakevision.runtime` is the one place that starts its servers, and the command line and the
demo drive the rest. Each stand-in refuses what Databricks refuses (see README, "Local must behave
like Databricks")."""
