"""Built-in studies; importing this module registers them."""

from distdl.studies import sharpness  # noqa: F401
