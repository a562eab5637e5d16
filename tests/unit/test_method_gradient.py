"""The training step against the method's definition, derived independently here from the paper's equations.

``MGRPOModule.backward_batch`` accumulates a gradient through micro-batches, layouts (padded, shared prefix, prefix
tree), global normalisers and per-layer weights. This file writes the objective once more with plain torch ops on a
fresh copy of the policy (no module code: one full forward per sequence, the loss term by term), differentiates it
with autograd, and requires the two gradients to agree. A wrong beta, a lost layer weight, a flipped advantage, the
wrong temperature or a mis-normalised layer moves the gradient by far more than float32 rounding, so each fails here.

The objective (DESIGN "The method in one screen", paper Eq. 2, 3, 6), minimised as its negative:

    L = L_1 + layer2_weight * L_2
    L_l = mean over the layer's completions i of  mean over i's tokens t of
          -( min(r_it * A_i, clip(r_it, 1 - eps, 1 + eps) * A_i) - beta * KL_it )
    r_it = pi_theta / pi_old,   KL_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1      (k3, Eq. 2)

with log-probs taken at the rollout temperature (``logits / T``). Layer 2's "mean over completions" is the default
DESIGN fixes and ``losses.py`` documents (a mean over all layer-2 completions of the batch); Eq. 6 read literally
sums over the G' kept queries (``1/H sum_j sum_h``), which here would double L_2 (G' = 2).

pi_old: the module trains each rollout batch with exactly one optimizer step, on-policy, so the policy that sampled
the batch has the current weights and ``r_it = 1`` in value (its gradient is ``grad logp``); the module takes
``old_logp = logp.detach()`` (documented in ``module.py``). The clip therefore cannot bind through the module's API
(``test_losses.py`` pins it on tensors). What the API does accept is engine behaviour log-probs that differ from the
policy's, used by truncated importance sampling (``tis_cap``): one case here gives every token such a log-prob,
some far enough to be capped, and derives the weighted surrogate ``min(exp(logp_old - logp_engine), cap) * min(...)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from mgrpo_pl.layouts import ContinuedMicroBatch, MicroBatch, SharedPrefixMicroBatch, micro_batch_layout
from mgrpo_pl.modeling.loading import load_causal_lm
from mgrpo_pl.module import MGRPOModule
from mgrpo_pl.rollout.types import RolloutBatch
from mgrpo_pl.settings import LossSettings, OptimSettings

BETA = 0.1
LAYER2_WEIGHT = 0.5
TEMPERATURE = 0.7
CLIP_EPS = 0.2
ADV_EPS = 1e-6  # RolloutConfig.advantage_eps, the eps of (r - mean) / (std + eps)
TIS_CAP = 2.0

# Rewards of the batch below and their advantages, by hand. std is the SAMPLE std (n - 1): DESIGN writes std(r) and the
# paper (Eq. 1, "relative rewards within each sampled group") does not say which; advantages.py documents the
# unbiased one, as TRL and verl compute it, so that is the one derived here.
#   layer 1, problem 0, G=4, r = [1, 0, 0, 0]: mean 1/4, centred [3/4, -1/4, -1/4, -1/4],
#            var = (9/16 + 3 * 1/16) / 3 = 1/4, std 1/2             -> A ~ [1.5, -0.5, -0.5, -0.5]
#   layer 1, problem 1, G=4, r = [1, 1, 0, 1]: mean 3/4, centred [1/4, 1/4, -3/4, 1/4], std 1/2
#                                                                      -> A ~ [0.5, 0.5, -1.5, 0.5]
#   layer 2, query 0, H=3,  r = [1, 1, 0]: mean 2/3, centred [1/3, 1/3, -2/3],
#            var = (1/9 + 1/9 + 4/9) / 2 = 1/3, std 1/sqrt(3)          -> A ~ [0.577, 0.577, -1.155]
#   layer 2, query 1, H=3,  r = [0, 1, 0]: mean 1/3, centred [-1/3, 2/3, -1/3], std 1/sqrt(3)
#                                                                      -> A ~ [-0.577, 1.155, -0.577]
REWARDS = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
CENTRED = [[0.75, -0.25, -0.25, -0.25], [0.25, 0.25, -0.75, 0.25], [1 / 3, 1 / 3, -2 / 3], [-1 / 3, 2 / 3, -1 / 3]]
STDS = [0.5, 0.5, 1 / math.sqrt(3), 1 / math.sqrt(3)]
ADVANTAGES = [c / (s + ADV_EPS) for centred, s in zip(CENTRED, STDS) for c in centred]

PROMPT_LENS = (6, 9)
LAYER1_LENS = ((5, 3, 7, 4), (6, 2, 5, 8))  # completion lengths of each problem's G=4 samples
PARENTS = (1, 5)  # layer-2 query j continues layer-1 row PARENTS[j] (a wrong answer of problem 0, a right one of 1)
GUIDE_LENS = (3, 4)
LAYER2_LENS = ((4, 6, 3), (5, 2, 7))


def _batch(vocab: int, seed: int = 0) -> RolloutBatch:
    """8 layer-1 rows (2 problems x G=4 sharing their prompt) and 6 layer-2 rows (2 kept queries x H=3 sharing their
    query). Query j is layer-1 row PARENTS[j] less its last (end-of-turn) token, then a guide phrase: the shape the
    rollout builds and the prefix-tree layout reuses."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> Tensor:
        return torch.randint(3, vocab, (n,), generator=g)

    seqs, plens = [], []
    for plen, lens in zip(PROMPT_LENS, LAYER1_LENS):
        prompt = tokens(plen)
        for n in lens:
            seqs.append(torch.cat([prompt, tokens(n)]))
            plens.append(plen)
    for parent, guide, lens in zip(PARENTS, GUIDE_LENS, LAYER2_LENS):
        query = torch.cat([seqs[parent][:-1], tokens(guide)])
        for n in lens:
            seqs.append(torch.cat([query, tokens(n)]))
            plens.append(len(query))
    rewards = torch.tensor([r for group in REWARDS for r in group])
    return RolloutBatch(
        sequences=seqs,
        prompt_lengths=torch.tensor(plens),
        advantages=torch.tensor(ADVANTAGES, dtype=torch.float32),
        layer=torch.tensor([1] * 8 + [2] * 6),
        truncated=torch.zeros(14, dtype=torch.bool),
        rewards=rewards,
        num_problems=2,
        correct_t1=rewards[:8].bool(),
        correct_t2=torch.zeros(8, dtype=torch.bool),
    )


def _token_logprobs(model: nn.Module, seq: Tensor, prompt_len: int) -> Tensor:
    """[|o|] log-probs of the completion tokens at TEMPERATURE, from one unpadded forward of prompt + completion.
    The logit at position t predicts token t + 1, so the completion's tokens are predicted from prompt_len - 1 on."""
    logits = model(seq[None]).logits[0, :-1].float() / TEMPERATURE
    return torch.log_softmax(logits, dim=-1).gather(1, seq[1:, None]).squeeze(1)[prompt_len - 1 :]


def _all_logprobs(model: nn.Module, batch: RolloutBatch) -> list[Tensor]:
    return [_token_logprobs(model, s, int(p)) for s, p in zip(batch.sequences, batch.prompt_lengths)]


def _engine_logprobs(behaviour: list[Tensor]) -> list[Tensor]:
    """Behaviour log-probs of a separate engine: the sampling policy's own shifted per token by +0.3, -0.3 or -1.5 in
    turn, i.e. truncated-IS weights exp(-0.3) = 0.741, exp(0.3) = 1.350 and exp(1.5) = 4.48, cut to TIS_CAP = 2."""
    shifts = torch.tensor([0.3, -0.3, -1.5])
    return [lp + shifts[torch.arange(len(lp)) % 3] for lp in behaviour]


def _paper_loss(
    policy: nn.Module, reference: nn.Module, batch: RolloutBatch, engine: list[Tensor] | None
) -> tuple[Tensor, Tensor]:
    """(L_1, L_2, ...) written from the equations, one completion at a time."""
    per_layer: dict[int, list[Tensor]] = {k: [] for k in sorted(set(batch.layer.tolist()))}
    for seq, plen, adv, layer in zip(batch.sequences, batch.prompt_lengths, batch.advantages, batch.layer):
        logp = _token_logprobs(policy, seq, int(plen))
        with torch.no_grad():
            ref = _token_logprobs(reference, seq, int(plen))
        old = logp.detach()  # on-policy: the sampling policy has the current weights (see the module docstring)
        ratio = torch.exp(logp - old)
        surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS) * adv)
        if engine is not None:
            row = sum(len(losses) for losses in per_layer.values())
            surrogate = surrogate * torch.clamp(torch.exp(old - engine[row]), max=TIS_CAP)
        kl = torch.exp(ref - logp) - (ref - logp) - 1  # k3, Eq. 2: pi_ref/pi - log(pi_ref/pi) - 1
        per_layer[int(layer)].append((-(surrogate - BETA * kl)).mean())  # mean over the completion's tokens
    return tuple(torch.stack(losses).mean() for losses in per_layer.values())  # mean over the layer's completions


@pytest.fixture(scope="module")
def module(tiny_model_path) -> MGRPOModule:
    m = MGRPOModule(
        model=str(tiny_model_path),
        temperature=TEMPERATURE,
        loss=LossSettings(beta=BETA, layer2_weight=LAYER2_WEIGHT, clip_eps=CLIP_EPS),
    )
    m.configure_model()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in m.reference.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


@pytest.fixture(scope="module")
def plain_policy(module, tiny_model_path) -> nn.Module:
    """A fresh copy of the policy's weights without the module's patches (memory-efficient MLP backward)."""
    model = load_causal_lm(tiny_model_path, dtype="float32").eval()
    model.load_state_dict(module.policy.state_dict())
    return model


LAYOUT_KINDS = {(True, True): ContinuedMicroBatch, (True, False): SharedPrefixMicroBatch, (False, False): MicroBatch}
LAYOUTS = {
    # name: (shared_prefix, prefix_tree, micro_batch_tokens)
    "default (prefix tree, one pass)": (True, True, 8192),
    "prefix tree, split": (True, True, 70),
    "shared prefix, split": (True, False, 60),
    "padded, split": (False, False, 40),
}


@pytest.mark.parametrize(
    ("layout", "tis"), [(name, False) for name in LAYOUTS] + [("default (prefix tree, one pass)", True)]
)
def test_step_gradient_is_the_paper_objectives(module, plain_policy, layout, tis):
    shared, tree, budget = LAYOUTS[layout]
    batch = _batch(len(module.tokenizer))
    # The layout named is the one the step runs: the tree continues a layer-1 row's cache in some micro-batch.
    plan, collate = micro_batch_layout(batch, budget, shared=shared, tree=tree)
    kinds = {type(collate(batch, rows, 0, False)) for rows in plan}
    assert kinds == {LAYOUT_KINDS[(shared, tree)]} or (tree and ContinuedMicroBatch in kinds), kinds
    engine = None
    if tis:
        with torch.no_grad():
            behaviour = _all_logprobs(plain_policy, batch)
        engine = batch.engine_logprobs = _engine_logprobs(behaviour)

    # The module's step, as training_step runs it (without the optimizer).
    eff, loss = module.efficiency, module.loss_settings
    saved = (eff.shared_prefix, eff.prefix_tree, eff.micro_batch_tokens, loss.tis_cap)
    try:
        eff.shared_prefix, eff.prefix_tree, eff.micro_batch_tokens = shared, tree, budget
        loss.tis_cap = TIS_CAP if tis else None
        module.policy.zero_grad(set_to_none=True)
        sums, num_micro = module.backward_batch(batch)
    finally:
        eff.shared_prefix, eff.prefix_tree, eff.micro_batch_tokens, loss.tis_cap = saved
    assert (num_micro > 1) == (budget < 1000)
    if tis:
        assert 0 < sums["tis_capped"] < sums["tokens"]  # some weights capped, some not: both branches are exercised
    got = {n: p.grad for n, p in module.policy.named_parameters()}

    # The same objective from the equations, autograd on the plain copy.
    plain_policy.zero_grad(set_to_none=True)
    loss1, loss2 = _paper_loss(plain_policy, module.reference, batch, engine)
    (loss1 + LAYER2_WEIGHT * loss2).backward()
    want = {n: p.grad for n, p in plain_policy.named_parameters()}

    assert sums["loss/layer1"] == pytest.approx(loss1.item(), abs=1e-6)
    assert sums["loss/layer2"] == pytest.approx(loss2.item(), abs=1e-6)
    assert list(got) == list(want)
    flat_got = torch.cat([g.flatten() for g in got.values()])
    flat_want = torch.cat([g.flatten() for g in want.values()])
    # Measured: the layouts agree with the derivation to 3e-7 of the norm (float32 rounding), while each wiring error
    # moves it far more: beta = 0 by 9e-2, layer2_weight 0 or 1 by 0.56, temperature 1 by 0.30, -A by 2.0.
    error = float((flat_got - flat_want).norm() / flat_want.norm())
    assert error < 1e-5, f"relative gradient error {error:.2e}"
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-5 * float(flat_want.abs().max()), rtol=1e-4, msg=name)


LAYER3_WEIGHT = 0.25


def test_three_layer_gradient_weights_each_layer(module, plain_policy):
    """A layer-3 group (H=2, r = [1, 0]: A = +-(1/2) / (sqrt(1/2) + eps)) continuing the first layer-2 row: the step
    is the gradient of ``L_1 + layer2_weight * L_2 + w_3 * L_3`` with w_3 from ``--model.loss.layer_weights``."""
    batch = _batch(len(module.tokenizer), seed=1)
    g = torch.Generator().manual_seed(2)
    query = torch.cat([batch.sequences[8][:-1], torch.randint(3, len(module.tokenizer), (3,), generator=g)])
    rows = [torch.cat([query, torch.randint(3, len(module.tokenizer), (n,), generator=g)]) for n in (3, 5)]
    a = 0.5 / (math.sqrt(0.5) + ADV_EPS)
    batch.sequences += rows
    batch.prompt_lengths = torch.cat([batch.prompt_lengths, torch.tensor([len(query)] * 2)])
    batch.advantages = torch.cat([batch.advantages, torch.tensor([a, -a])])
    batch.layer = torch.cat([batch.layer, torch.tensor([3, 3])])
    batch.truncated = torch.zeros(len(rows) + 14, dtype=torch.bool)
    batch.rewards = torch.cat([batch.rewards, torch.tensor([1.0, 0.0])])
    batch.num_layers = 3
    module.loss_settings.layer_weights = {3: LAYER3_WEIGHT}
    try:
        module.policy.zero_grad(set_to_none=True)
        sums, _ = module.backward_batch(batch)
    finally:
        module.loss_settings.layer_weights = {}
    got = torch.cat([p.grad.flatten() for p in module.policy.parameters()])
    plain_policy.zero_grad(set_to_none=True)
    loss1, loss2, loss3 = _paper_loss(plain_policy, module.reference, batch, None)
    (loss1 + LAYER2_WEIGHT * loss2 + LAYER3_WEIGHT * loss3).backward()
    want = torch.cat([p.grad.flatten() for p in plain_policy.parameters()])
    assert sums["loss/layer3"] == pytest.approx(loss3.item(), abs=1e-6)
    error = float((got - want).norm() / want.norm())
    assert error < 1e-5, f"relative gradient error {error:.2e}"


def test_hand_advantages_are_the_pipelines():
    """The advantages derived above are what the rollout's ``group_advantages`` (paper scaling) gives, so the batch
    the gradient test trains on is one the pipeline could have produced."""
    from mgrpo_pl.algo.advantages import group_advantages

    # One group per call: G = 4 and H = 3 differ, and [num_groups, group_size] must be rectangular.
    flat = [group_advantages(torch.tensor([r]), "group", ADV_EPS).flatten() for r in REWARDS]
    torch.testing.assert_close(torch.cat(flat), torch.tensor(ADVANTAGES), atol=1e-6, rtol=0)


def _direction_batch(vocab: int, seed: int) -> RolloutBatch:
    """One problem: G=2 layer-1 samples with r = [1, 0], and one kept query (continuing the wrong sample) with H=2
    corrections, r = [0, 1]. Each group has mean 1/2 and sample std sqrt(1/2), so A = +-(1/2) / (sqrt(1/2) + eps)
    ~ +-0.7071: rows 0 and 3 are reinforced, rows 1 and 2 discouraged."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> Tensor:
        return torch.randint(3, vocab, (n,), generator=g)

    prompt = tokens(7)
    seqs = [torch.cat([prompt, tokens(5)]), torch.cat([prompt, tokens(6)])]
    query = torch.cat([seqs[1][:-1], tokens(3)])
    seqs += [torch.cat([query, tokens(4)]), torch.cat([query, tokens(5)])]
    a = 0.5 / (math.sqrt(0.5) + ADV_EPS)
    return RolloutBatch(
        sequences=seqs,
        prompt_lengths=torch.tensor([7, 7, len(query), len(query)]),
        advantages=torch.tensor([a, -a, -a, a]),
        layer=torch.tensor([1, 1, 2, 2]),
        truncated=torch.zeros(4, dtype=torch.bool),
        rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]),
        num_problems=1,
        correct_t1=torch.tensor([True, False]),
        correct_t2=torch.tensor([False, True]),
    )


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on workers and logging, not about the step
def test_one_trainer_step_moves_log_probs_with_the_advantage_sign(tiny_model_path):
    """A real Lightning step (``training_step``: zero_grad, backward_batch, optimizer, scheduler) raises the mean
    token log-prob of every positive-advantage completion and lowers every negative one, in both layers.

    beta = 0 and plain SGD, so the step is lr * (the policy gradient): to first order completion i moves by
    lr / N * sum_j A_j <grad logp_i, grad logp_j>, dominated by its own A_i |grad logp_i|^2. At lr 1e-2 each moves by
    0.2 to 0.4 nats (measured over seeds 0-5), far from zero; at lr 1 the step overshoots and signs stop being
    predictable, which is why the rate is small.
    """
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    module = MGRPOModule(
        model=str(tiny_model_path),
        temperature=TEMPERATURE,
        loss=LossSettings(beta=0.0),
        optimizer=lambda params: torch.optim.SGD(params, lr=1e-2),
        optim=OptimSettings(lr_schedule="constant", warmup_ratio=0.0, max_grad_norm=None),
    )
    module.configure_model()
    batch = _direction_batch(len(module.tokenizer), seed=0)

    def mean_logprobs() -> Tensor:
        with torch.no_grad():
            return torch.stack([lp.mean() for lp in _all_logprobs(module.policy, batch)])

    before = mean_logprobs()
    trainer = Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # batch_size=None hands the RolloutBatch to training_step as it is (in a run, the rollout hook builds it).
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
    assert trainer.global_step == 1
    moved = mean_logprobs() - before
    assert torch.equal(torch.sign(moved), torch.sign(batch.advantages)), moved
    assert bool((moved.abs() > 0.05).all()), moved  # a real move, not rounding
