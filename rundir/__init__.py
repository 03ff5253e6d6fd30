"""The run directory, on the floor below both training and evaluation: what a run saves and every
tool reads back. Its config (config.py), the checkpoint format (checkpoints.py: names, manifests,
which checkpoint is usable; checkpoint_store.py: the layout-free tensor store), safetensors
directories (safetensors_io.py), the tokenizer (tokenizer.py) and reading a finished run's model
state without building anything (state.py). Imports only `model`, never `trainer` or `evaluation`.
"""
