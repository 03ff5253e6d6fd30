"""The modules that know DeepSpeed or its file formats: expert-parallel wiring (parallel.py), the
DeepSpeed JSON (ds_config.py), the module the engine wraps (objective.py), the engine's side of
checkpoints (checkpoint.py) and building the engine (build.py). Nothing outside trainer/ imports them."""
