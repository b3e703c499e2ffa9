"""Sweeps: hyperparameter searches over any config keys on Ray Tune (`distdl sweep CONFIG`)."""
