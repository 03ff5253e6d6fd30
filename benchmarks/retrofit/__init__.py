"""The small-scale retrofit demonstration (issue 12), split by job: task.py writes and prepares
the synthetic task, arms.py builds and runs the training arms, decode.py measures the sampler.
benchmarks/retrofit_demo.py is the one command that runs them all."""
