"""Studies: sets of training runs whose solutions are measured and reported (distdl study NAME FILE)."""
