"""distdl: Ray Train runs DeepSpeed data-parallel workers; studies of training at scale."""

__version__ = "0.1.0"
