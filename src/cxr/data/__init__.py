"""Data: sources -> raw manifest (ingest) -> prepared arrays (prepare) -> batches (loader)."""
