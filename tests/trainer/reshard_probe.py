"""Launched by tests/trainer/test_reshard.py (trainer/launch.py, env:// ranks): set up a run at this
layout (which loads its newest checkpoint, written at another layout), then save that state again,
untouched, into PROBE_OUT. The test compares the two checkpoints tensor by tensor."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from rundir.config import load_config  # noqa: E402
from trainer.engine.checkpoint import save_checkpoint  # noqa: E402
from train import parse_args  # noqa: E402
from trainer.session import setup  # noqa: E402


def main() -> None:
    args = parse_args()
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    s = setup(load_config(args.config, tuple(args.overrides)), args.ds_config)
    assert s.start_step > 0, "the probe must resume from a checkpoint"
    save_checkpoint(s.engine, s.model, os.environ["PROBE_OUT"], s.start_step, s.run_state(s.start_step),
                    layout=s.layout, keep_last=1, scheduler=s.scheduler)
    s.loader.close()


if __name__ == "__main__":
    main()
