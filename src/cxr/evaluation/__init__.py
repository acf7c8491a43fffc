"""Evaluation: metrics with bootstrap CIs, plots, ``evaluate`` on the prepared splits, and external evaluation
of the served model through its HTTP API with its HTML report."""
