"""Cluster launch, above the driver: `distdl submit slurm` (slurm.py) and `distdl submit ray`
(submit.py), the per-node wrapper a Slurm job runs on each node (ray_node.py), and how a process
joins Ray (connect.py), which the command line hands to the driver."""
