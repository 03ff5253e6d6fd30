"""benchmarks/train_throughput.py's parts, one job a file:

    presets.py          the presets, the implementations (EC, TC, dense) as config overrides, run configs
    code_state.py       which code a table measured: commit, dirty files, a snapshot the runs execute
    runs.py             the multi-process training runs: launch, read the logged windows, summarize
    profile_modules.py  one process, no DeepSpeed: fwd+bwd, the FFN's share, AdamW, hottest operators
    profile_engine.py   the trainer's own set-up and train step in N processes, timed by phase
    report.py           the printed tables and the JSON
"""
