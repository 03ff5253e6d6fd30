"""Hangs (issue 13, item 2): SIGSTOP one rank of a 2-process run. The other rank waits in a
collective where no Python code of its main thread runs; its watchdog must dump its stacks into
the log, naming rank and host, and end the job with status 88 (requeue) within the budget plus
60 s. The resumed run continues from the last complete checkpoint. Plain env:// ranks: that a
status reaches the scheduler through the `deepspeed` launcher is tests/faults/test_signals.py's."""
import re

from tests.faults.faultrun import Run, complete_steps, first_error_line, overrides

EXIT_HANG = 88
HANG_S = 12   # short, yet well above a tiny step on a loaded 2-core machine


def test_stopped_rank_ends_the_job_with_stacks_and_resume_continues(small_corpus, tmp_path):
    run_dir = tmp_path / "hang"
    common = {"train.save_every": 2, "train.keep_last": 10, "train.comm_timeout_s": 900}
    run = Run.env(2, overrides(small_corpus, run_dir, **{"train.max_steps": 200, "train.hang_timeout_s": HANG_S,
                                                               **common}))
    run.wait_for_step(run_dir, 3)
    saved = complete_steps(run_dir)
    assert saved and saved[-1] >= 2, saved
    run.ranks()[1].suspend()   # SIGSTOP: alive, silent, holding its sockets open
    rc, text = run.finish(timeout=HANG_S + 60), run.text()
    assert rc == EXIT_HANG, text[-4000:]
    line = first_error_line(text)
    assert re.search(r"watchdog: rank 0 on \S+ \(pid \d+\) saw no progress for " + str(HANG_S) + " s", line), line
    dump = text[text.index(line):]
    assert "most recent call first" in dump and "trainer/loop.py" in dump, dump[:3000]
    assert "rank 0" in (run_dir / "watchdog" / "rank0.txt").read_text()
    kept = complete_steps(run_dir)
    assert set(saved) <= set(kept), (saved, kept)   # no complete checkpoint lost

    newest = kept[-1]
    again = Run.env(2, overrides(small_corpus, run_dir, **{"train.max_steps": newest + 1, **common}))
    rc, text = again.finish(), again.text()
    assert rc == 0, text[-4000:]
    assert f"resumed from {run_dir}/checkpoints/step_{newest:08d} at step {newest}" in text, text[-4000:]
