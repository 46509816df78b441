"""Pure PyTorch models (no Ray, MLflow or storage): frozen configs with a docstring per field, NamedTuple
outputs, shape-suffixed names, ``config.json`` + safetensors checkpoints (checkpoint.py)."""
