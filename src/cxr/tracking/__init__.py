"""MLflow: runs and lineage (runs), the pyfunc flavour (pyfunc), the registry with its gated promotion
(registry), and the one resolver of model URIs (uris)."""
