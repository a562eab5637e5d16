"""Benchmarks, each measured side by side with what it replaces, in one run:

- ``trl``: an MGRPO step and a GRPO step against TRL's ``GRPOTrainer`` on the same model and batch (``runners``
  holds the timed runs of each side, ``report`` turns rounds into ratios and markdown);
- ``layout``: the three training layouts (padded, shared prefix, prefix tree) on one synthetic batch;
- ``rollout``: the generation engines, tokens per second;
- ``rewards``: the math reward's throughput and its worker pool.
"""
