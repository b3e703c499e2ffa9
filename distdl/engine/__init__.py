"""DeepSpeed behind one door: nothing outside this package imports deepspeed.

- `engine`: `Engine` and `EngineSet`, a workload's model(s) inside DeepSpeed engines;
- `deepspeed_config`: the DeepSpeed JSON built from distdl's config;
- `zero_fragments`: the ZeRO partition maps the layer-wise optimizers read;
- `checkpoints`: checkpoint files (names, random states, verification, consolidation, resharding) and
  `trained_state`, the one reader of a finished run's weights.
"""
