"""The one adapter to DeepSpeed: every use of its internals (engine creation, ZeRO partitions, optimizer state
layout, its process-group cache, its accelerator choice) is in this package, so a DeepSpeed upgrade is checked
in one place. The rest of mpoe calls these functions and the engine's public methods.

- `accelerator`: the device DeepSpeed trains on, chosen once per process.
- `engine`: our config as DeepSpeed's, `deepspeed.initialize`, the LR schedule.
- `distributed`: the world started through DeepSpeed, and its expert-parallel process groups.
- `gradients`: what the training step reads of, or does with, the gradients inside the engine.
- `optimizer_state`: the optimizer's native state (saved and loaded as is) and Adam's state per parameter.
"""
