"""Training: ``fit(cfg, callbacks)`` runs the one loop; callbacks log to MLflow, stop early, prune and time;
the threshold is chosen on validation and the model card is written beside the weights."""
