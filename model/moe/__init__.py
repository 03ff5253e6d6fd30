"""Mixture-of-experts layers for diffusion LMs: expert-choice and token-choice routing
(routing.py), timestep-aware capacity and its config (capacity.py), stacked experts (experts.py),
the dispatch/combine communication interface (dispatch.py) and the layer itself (layer.py).
Import from the submodules: this file imports nothing, so model/config.py can read capacity.py
without loading the layer."""
