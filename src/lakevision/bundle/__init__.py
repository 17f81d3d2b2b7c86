"""The asset bundle on this machine: load and validate ``databricks.yml``, run its jobs locally."""
