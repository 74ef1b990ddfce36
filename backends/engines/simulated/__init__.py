"""The simulated engine: the built-in engine's scheduler and KV bookkeeping, with forward passes
that take a calibrated timing model's time instead of running a model (``engine.SimEngine``).
The timing models (``timing``), the named profiles (``profiles``) and the GPU tables shipped with
the package (``shipped``, ``gpu_tables.json``) are here too; the cluster simulator
(orchestrator/sim) prices its passes with the same models."""
