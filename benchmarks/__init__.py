"""Benchmarks: measured, never asserted on time (DESIGN.md, "Performance method").

A regular package, not a namespace one: on a lent GPU machine a same-named `benchmarks` package
elsewhere on the path would otherwise shadow or merge with this one."""
