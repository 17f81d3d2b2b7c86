"""Batch scoring: a registered model over a Delta table of images, on the Spark workers, into a
Delta table of predictions (the score job)."""
