"""MGRPOModule's loss outside a Trainer: micro-batching never changes the gradient, and log-probs line up."""

import pytest
import torch

from mgrpo_pl.layouts.padded import collate_micro_batch
from mgrpo_pl.module import MGRPOModule
from mgrpo_pl.rollout.types import RolloutBatch
from mgrpo_pl.settings import LossSettings


def _batch(vocab, seed=0):
    """6 layer-1 and 4 layer-2 sequences with ragged prompts and completions, one truncated."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [5, 5, 5, 7, 7, 7, 14, 16, 14, 16]
    comp_lens = [3, 8, 1, 6, 6, 2, 4, 9, 5, 7]
    seqs = [torch.randint(3, vocab, (p + c,), generator=g) for p, c in zip(prompt_lens, comp_lens)]
    return RolloutBatch(
        sequences=seqs,
        prompt_lengths=torch.tensor(prompt_lens),
        advantages=torch.randn(10, generator=g),
        layer=torch.tensor([1] * 6 + [2] * 4),
        truncated=torch.tensor([False] * 9 + [True]),
        rewards=torch.zeros(10),
        num_problems=2,
        correct_t1=torch.zeros(6, dtype=torch.bool),
        correct_t2=torch.zeros(6, dtype=torch.bool),
    )


@pytest.fixture(scope="module")
def module(tiny_model_path):
    m = MGRPOModule(model=str(tiny_model_path), loss=LossSettings(beta=0.1))
    m.configure_model()
    with torch.no_grad():  # make policy and reference differ so the KL term has a gradient
        for p in m.policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _grads(module, batch, budget, mode, mask_truncated=False):
    module.efficiency.micro_batch_tokens = budget
    module.loss_settings.mask_truncated = mask_truncated
    module.loss_settings.aggregation = mode
    module.policy.zero_grad()
    sums, num_micro = module.backward_batch(batch)
    return {n: p.grad.clone() for n, p in module.policy.named_parameters()}, sums, num_micro


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_micro_batching_does_not_change_the_gradient(module, mode):
    from mgrpo_pl.algo.losses import LossAggregation

    batch = _batch(len(module.tokenizer))
    whole, sums_whole, n_whole = _grads(module, batch, 10_000, LossAggregation(mode))
    split, sums_split, n_split = _grads(module, batch, 40, LossAggregation(mode))
    assert n_whole == 1 and n_split > 3
    for name, g in whole.items():
        torch.testing.assert_close(split[name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert sums_split["loss/layer1"] == pytest.approx(sums_whole["loss/layer1"], abs=1e-6)
    assert sums_split["loss/layer2"] == pytest.approx(sums_whole["loss/layer2"], abs=1e-6)


def test_mask_truncated_drops_the_truncated_completion(module):
    from mgrpo_pl.algo.losses import LossAggregation

    batch = _batch(len(module.tokenizer))
    _, kept, _ = _grads(module, batch, 10_000, LossAggregation.TOKEN_MEAN)
    _, masked, _ = _grads(module, batch, 10_000, LossAggregation.TOKEN_MEAN, mask_truncated=True)
    assert masked["tokens"] == kept["tokens"] - 7  # the truncated layer-2 completion had 7 tokens


def test_left_padded_micro_batch_logprobs_equal_unpadded_forward(module):
    batch = _batch(len(module.tokenizer), seed=3)
    mb = collate_micro_batch(batch, list(range(10)), int(module.tokenizer.pad_token_id), mask_truncated=False)
    with torch.no_grad():
        packed = module._completion_logprobs(module.policy, mb)
        for row in range(10):
            seq = batch.sequences[row]
            comp = len(seq) - int(batch.prompt_lengths[row])
            logits = module.policy(seq[None]).logits[0, :-1].float()
            expected = torch.log_softmax(logits, -1).gather(1, seq[1:, None]).squeeze(1)[-comp:]
            got = packed[row][mb.mask[row]]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_constructor_errors_name_the_flag(tiny_model_path):
    with pytest.raises(ValueError, match="--model.loss.aggregation 'sum'"):
        LossSettings(aggregation="sum")
    with pytest.raises(ValueError, match="--model.loss.beta"):
        LossSettings(beta=-1.0)
    with pytest.raises(ValueError, match="--model.temperature"):
        MGRPOModule(model=str(tiny_model_path), temperature=0.0)


def _with_engine_logprobs(module, batch, shift):
    """The batch with engine log-probs = the trainer's own (from the current policy) + ``shift`` per token."""
    mb = collate_micro_batch(batch, list(range(len(batch.sequences))), int(module.tokenizer.pad_token_id), False)
    with torch.no_grad():
        lp = module._completion_logprobs(module.policy, mb)
    batch.engine_logprobs = [
        lp[r][lp.shape[1] - (len(s) - int(p)) :] + shift
        for r, (s, p) in enumerate(zip(batch.sequences, batch.prompt_lengths))
    ]
    return batch


def test_truncated_is_reweights_by_the_engine_mismatch(module):
    from mgrpo_pl.algo.losses import LossAggregation

    mode = LossAggregation.SEQ_MEAN_TOKEN_MEAN
    vocab = len(module.tokenizer)
    plain, _, _ = _grads(module, _batch(vocab), 10_000, mode)
    try:
        module.loss_settings.tis_cap = 2.0
        # Engine agrees with the trainer: every weight is 1, the gradient is the unweighted one.
        same, sums, _ = _grads(module, _with_engine_logprobs(module, _batch(vocab), 0.0), 10_000, mode)
        assert sums["tis_weight"] / sums["tokens"] == pytest.approx(1.0, abs=1e-5)
        assert sums["tis_capped"] == 0
        for name, g in plain.items():
            torch.testing.assert_close(same[name], g, atol=1e-6, rtol=1e-5, msg=name)
        # Engine twice as confident in every token: weight 1/2 each, nothing capped.
        _, sums, _ = _grads(module, _with_engine_logprobs(module, _batch(vocab), 0.6931472), 10_000, mode)
        assert sums["tis_weight"] / sums["tokens"] == pytest.approx(0.5, abs=1e-5)
        # Engine far less confident: every ratio e^5 is cut to the cap.
        _, sums, _ = _grads(module, _with_engine_logprobs(module, _batch(vocab), -5.0), 10_000, mode)
        assert sums["tis_weight"] / sums["tokens"] == pytest.approx(2.0, abs=1e-6)
        assert sums["tis_capped"] == sums["tokens"]
        with pytest.raises(ValueError, match="--model.loss.tis_cap needs the engine's behaviour log-probs"):
            _grads(module, _batch(vocab), 10_000, mode)
    finally:
        module.loss_settings.tis_cap = None


def test_tis_cap_below_one_names_the_flag(tiny_model_path):
    with pytest.raises(ValueError, match="--model.loss.tis_cap must be >= 1"):
        LossSettings(tis_cap=0.5)


def _grouped_batch(vocab, seed=0):
    """2 problems x G=3 layer-1 samples sharing their prompt, and 2 kept queries x H=2 layer-2 samples sharing
    their whole query (prompt + a layer-1 completion + guide), with ragged completions (one empty, one truncated)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in (6, 9)]
    queries = [torch.randint(3, vocab, (n,), generator=g) for n in (20, 17)]
    seqs, plens = [], []
    for p, lens in zip(prompts, ((4, 7, 2), (5, 0, 8))):
        for n in lens:
            seqs.append(torch.cat([p, torch.randint(3, vocab, (n,), generator=g)]))
            plens.append(len(p))
    for q, lens in zip(queries, ((6, 3), (9, 5))):
        for n in lens:
            seqs.append(torch.cat([q, torch.randint(3, vocab, (n,), generator=g)]))
            plens.append(len(q))
    return RolloutBatch(
        sequences=seqs,
        prompt_lengths=torch.tensor(plens),
        advantages=torch.randn(10, generator=g),
        layer=torch.tensor([1] * 6 + [2] * 4),
        truncated=torch.tensor([False] * 7 + [True] + [False] * 2),
        rewards=torch.zeros(10),
        num_problems=2,
        correct_t1=torch.zeros(6, dtype=torch.bool),
        correct_t2=torch.zeros(6, dtype=torch.bool),
    )


@pytest.mark.parametrize("budget", [10_000, 60])
def test_shared_prefix_training_gives_the_plain_gradient(module, budget):
    from mgrpo_pl.algo.losses import LossAggregation
    from mgrpo_pl.layouts.shared_prefix import shared_prefix_plan

    batch = _grouped_batch(len(module.tokenizer))
    assert shared_prefix_plan(batch, budget) is not None  # the prompts repeat, so sharing applies
    try:
        module.efficiency.shared_prefix = False
        plain, sums_plain, _ = _grads(module, batch, budget, LossAggregation.SEQ_MEAN_TOKEN_MEAN, mask_truncated=True)
        module.efficiency.shared_prefix = True
        shared, sums_shared, n_shared = _grads(
            module, batch, budget, LossAggregation.SEQ_MEAN_TOKEN_MEAN, mask_truncated=True
        )
    finally:
        module.efficiency.shared_prefix = True
    assert (n_shared > 1) == (budget < 1000)
    assert sums_shared["tokens"] == sums_plain["tokens"]
    for key in ("loss/layer1", "loss/layer2", "kl_mean"):
        assert sums_shared[key] == pytest.approx(sums_plain[key], rel=1e-5, abs=1e-6), key  # float32 sums
    for name, g in plain.items():
        torch.testing.assert_close(shared[name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("budget", [10_000, 70])
def test_prefix_tree_training_gives_the_plain_gradient(module, budget):
    """Layer-2 queries built from layer-1 rows (the row less its last token, then a guide phrase): trained on top of
    those rows' caches, the loss and gradient are the plain layout's."""
    from mgrpo_pl.algo.losses import LossAggregation
    from mgrpo_pl.layouts.prefix_tree import collate_prefix_tree, prefix_tree_plan

    vocab = len(module.tokenizer)
    batch = _grouped_batch(vocab)
    g = torch.Generator().manual_seed(1)
    for k, parent in enumerate((0, 3)):  # the two layer-2 queries continue layer-1 rows 0 and 3
        query = torch.cat([batch.sequences[parent][:-1], torch.randint(3, vocab, (3,), generator=g)])
        for r in (6 + 2 * k, 7 + 2 * k):
            completion = batch.sequences[r][int(batch.prompt_lengths[r]) :]
            batch.sequences[r] = torch.cat([query, completion])
            batch.prompt_lengths[r] = len(query)
    plan = prefix_tree_plan(batch, budget)
    assert plan is not None and any(hasattr(collate_prefix_tree(batch, rows, 0, True), "parent_index") for rows in plan)
    try:
        module.efficiency.shared_prefix = False
        plain, sums_plain, _ = _grads(module, batch, budget, LossAggregation.SEQ_MEAN_TOKEN_MEAN, mask_truncated=True)
        module.efficiency.shared_prefix = True
        tree, sums_tree, _ = _grads(module, batch, budget, LossAggregation.SEQ_MEAN_TOKEN_MEAN, mask_truncated=True)
    finally:
        module.efficiency.shared_prefix = True
    assert sums_tree["tokens"] == sums_plain["tokens"]
    for key in ("loss/layer1", "loss/layer2", "kl_mean"):
        assert sums_tree[key] == pytest.approx(sums_plain[key], rel=1e-5, abs=1e-6), key  # float32 sums
    for name, grad in plain.items():
        torch.testing.assert_close(tree[name], grad, atol=1e-5, rtol=1e-4, msg=name)
