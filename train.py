"""Entry point of a training run: the one place that composes training with what evaluation adds to
it (in-training tasks, reading Hugging Face directories for `init.from`), so that trainer/ never
imports evaluation/.

    deepspeed train.py --ds_config ds_configs/zero2.json [--config configs/NAME.yaml ...] [key=value ...]

Also runs under `srun`/`mpirun` (RANK/WORLD_SIZE/MASTER_* set by the launcher script, or MPI
discovery through mpi4py). Exit status: 0 done, 85 preempted by SIGUSR1 (requeue me), 86 stopped
by SIGTERM after a checkpoint, 87 stopped on a non-finite loss or gradient (train.nonfinite; no
checkpoint written after it, do not requeue), 88 hang: no step within the watchdog's budget (stacks
in the log, requeue me), 2 bad configuration or input. docs/operations.md "Faults and exit statuses".
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:   # `deepspeed train.py` from another directory runs the file by path
    sys.path.insert(0, ROOT)

from model.config import ConfigError  # noqa: E402
from rundir.checkpoints import CheckpointError  # noqa: E402
from rundir.config import load_config  # noqa: E402
from rundir.errors import DataError  # noqa: E402
from trainer.hooks import RunHooks  # noqa: E402
from trainer.launcher_watch import watch_deepspeed_launcher  # noqa: E402
from trainer.preemption import install_handlers, note_stop  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pretrain a masked-diffusion MoE LM with DeepSpeed.")
    p.add_argument("--ds_config", default="ds_configs/zero2.json", help="DeepSpeed JSON (ZeRO settings)")
    p.add_argument("--config", action="append",
                   help="YAML preset in configs/ (default configs/tiny.yaml); repeat it to layer files, "
                   "later ones overriding earlier ones")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.max_steps=50")
    args = p.parse_args(argv)
    args.config = args.config or ["configs/tiny.yaml"]
    return args


def run_hooks(cfg) -> RunHooks:
    """Evaluation's part of a training run. Task fields are checked here, before anything else."""
    from evaluation.hf.importer import load_hf_dir, read_config_json
    from evaluation.tasks import TrainingTasks
    hf = {"read_hf_dir": load_hf_dir, "check_hf_dir": read_config_json}
    if not cfg.eval.tasks:
        return RunHooks(**hf)
    tasks = TrainingTasks(cfg)
    return RunHooks(check=tasks.check, evaluate=tasks.evaluate, **hf)


def main(argv=None) -> int:
    install_handlers()   # first: SLURM's USR1 warning during set-up or resume is kept, not fatal
    watch_deepspeed_launcher(note_stop)   # `deepspeed` itself killed: stop cleanly, leave no orphan
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from trainer import watchdog
    try:
        cfg = load_config(args.config, tuple(args.overrides))
        hooks = run_hooks(cfg)
        t = cfg.train
        watchdog.start(cfg.run_dir, t.setup_timeout_s, t.hang_timeout_s)   # set-up can hang too
        from trainer.loop import run   # imports DeepSpeed: only after the config is known good
        return run(cfg, args.ds_config, hooks)
    except (ConfigError, CheckpointError, FileNotFoundError, DataError) as err:   # bad input: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from trainer.engine.checkpoint import EXIT_SAVE_FAILED, CheckpointSaveError, NonFiniteWeightsError
        if isinstance(err, (CheckpointSaveError, NonFiniteWeightsError)):   # nothing saved was lost
            print(f"error: {err}", file=sys.stderr)
            return EXIT_SAVE_FAILED
        raise
    finally:
        watchdog.stop()   # the end of a run, or an error, is not a hang


if __name__ == "__main__":
    sys.exit(main())
