"""Tuning: an Optuna study whose objective is the training function itself, with pruning, storages and resume."""
