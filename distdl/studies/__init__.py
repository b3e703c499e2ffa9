"""Studies: sets of training runs whose solutions are measured and reported (distdl study NAME FILE).
Importing this package registers the built-in studies."""

from distdl.studies import overparam, scaling, sharpness, temperature  # noqa: F401
