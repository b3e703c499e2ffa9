"""`distdl plan`'s parts: a cluster's description (cluster.py) and the model of step time,
communication and time-to-target that predicts a run at N GPUs (model.py)."""
