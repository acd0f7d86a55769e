"""The policy-gradient search as a lifecycle: its knobs, the run loop, its history and checkpoints.

The math it calls (sampling, estimator, baseline, projection) is in pruner.pg_math and
pruner.budget; building a run from a model and a corpus is pruner.methods.pg.
"""
