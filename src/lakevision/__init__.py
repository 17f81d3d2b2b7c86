"""lakevision."""
