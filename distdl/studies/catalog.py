"""Built-in studies; importing this module registers them."""

from distdl.studies import overparam, scaling, sharpness  # noqa: F401
