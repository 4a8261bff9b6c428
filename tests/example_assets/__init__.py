"""Tiny models and data for the examples in `examples/`: each module's `build(folder)` writes them and
returns the example's `trainer_config` (`TrainerContext.config`)."""
