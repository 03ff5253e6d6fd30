"""Everything that loads a finished checkpoint on its own: loading, sampling, likelihood, multiple
choice, the perplexity bound, the lm-eval adapter and the run report. Never imports the training
loop; the loop may call `evaluation.tasks` for on-the-fly scoring."""
