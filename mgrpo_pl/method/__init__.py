"""The MGRPO method in one place.

- ``step``: one training step's rollout as layers: layer 1 sampled and scored, then the correction layer built from
  its outputs (probe, verify, select, H groups), returned as one ``RolloutBatch``.
- ``loss``: the step's loss as the sum over layers of each layer's GRPO loss times its weight.
- ``evaluation``: the two-turn evaluation behind Acc@t1, Acc@t2 and the transitions.
- ``parts``: what those share (prompts, correction queries, scoring, reading turn 2); ``layers``: one layer's rows.

The equations are in ``mgrpo_pl.algo`` (advantages, the clipped surrogate and KL, query building and selection);
generation is behind ``mgrpo_pl.rollout.engines``; how a batch is cut into forward passes is ``mgrpo_pl.layouts``.
"""

from mgrpo_pl.method.parts import encode_prompt
from mgrpo_pl.method.step import MGRPORollout

__all__ = ["MGRPORollout", "encode_prompt"]
