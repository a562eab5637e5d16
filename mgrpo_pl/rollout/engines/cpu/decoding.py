"""The transformers engine's sampling loop: a shared prompt is computed once, finished rows stop costing compute.

``model.generate(num_return_sequences=n)`` copies every prompt n times before its first forward, so GRPO's G samples
(and MGRPO's H layer-2 samples, whose prompt is a whole correction query) each recompute the same prompt. It also
keeps stepping rows that have already ended until the longest is done, and its default cache grows by re-copying
all keys and values at every step. This loop instead

1. runs each distinct prompt once (all but its last token) and repeats the resulting cache to its n rows;
2. samples one token per live row per step, writing keys and values into a cache with room reserved up front;
3. drops finished rows from the batch once enough of them have ended (``compact_below``);
4. given a ``PrefixCache`` (one rollout's), starts each prompt from the keys and values of the earlier sequence it
   shares the longest prefix with, and stores every row it samples (``prefix_cache.py``).

Sampling follows ``SamplingConfig`` only (temperature, then top-k, then top-p, as transformers' warpers order them);
the model's own generation config (repetition penalty and the like) is not applied, as in the vLLM engine. The
recorded behaviour log-probs are ``log_softmax(logits / T)`` of the sampled token, before top-k/top-p, which is what
the trainer recomputes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from mgrpo_pl.rollout.engines.cpu.prefix_cache import PrefixCache
from mgrpo_pl.rollout.engines.cpu.row_linear import decode_linears
from mgrpo_pl.rollout.types import SamplingConfig


class _ReservedLayer(DynamicLayer):
    """A full-attention cache layer that writes new keys/values into spare room instead of ``torch.cat``-ing the
    whole cache at every step (which makes decoding quadratic in memory traffic). ``keys``/``values`` are views of
    the filled part, so everything that reads a ``DynamicLayer`` reads this one the same way."""

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = reserve
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self._len = 0

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_len = self._len + key_states.shape[-2]
        if self._k is None or new_len > self._k.shape[-2]:
            capacity = max(new_len + self.reserve, 2 * (self._k.shape[-2] if self._k is not None else 0))
            self._k = self._grow(self._k, key_states, capacity)
            self._v = self._grow(self._v, value_states, capacity)
        assert self._k is not None and self._v is not None
        self._k[..., self._len : new_len, :] = key_states
        self._v[..., self._len : new_len, :] = value_states
        self._len = new_len
        self._refresh()
        return self.keys, self.values  # type: ignore[return-value]

    def _grow(self, old: Tensor | None, like: Tensor, capacity: int) -> Tensor:
        buf = like.new_empty(*like.shape[:-2], capacity, like.shape[-1])
        if old is not None and self._len:
            buf[..., : self._len, :] = old[..., : self._len, :]
        return buf

    def _refresh(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys, self.values = self._k[..., : self._len, :], self._v[..., : self._len, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None:
            self._k, self._v = self._k.repeat_interleave(repeats, dim=0), self._v.repeat_interleave(repeats, dim=0)
            self._refresh()

    def batch_select_indices(self, indices: Tensor) -> None:
        if self._k is not None:
            self._k, self._v = self._k[indices], self._v[indices]  # type: ignore[index]
            self._refresh()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the sampling cache is append-only")


def new_cache(model: nn.Module, reserve: int) -> DynamicCache:
    """A cache for ``model`` whose full-attention layers reserve ``reserve`` extra positions; other layer kinds
    (sliding window, linear attention) keep transformers' own classes."""
    config = getattr(model, "config", None)
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers:
        cache.layers = [_ReservedLayer(reserve) if type(layer) is DynamicLayer else layer for layer in layers]
    return cache


# Nucleus sampling without top-k first looks for the nucleus among this many likeliest tokens, and sorts the whole
# vocabulary only for a row whose nucleus is wider (a flat distribution). 32 rows of a 151,936-token vocabulary: a
# full sort takes 340 ms on the 2-core benchmark machine, this top-k 24 ms.
NUCLEUS_CANDIDATES = 1024


def choose_tokens(logits: Tensor, sampling: SamplingConfig) -> tuple[Tensor, Tensor]:
    """Next token per row from [R, V] logits, and its log-prob under ``log_softmax(logits / T)`` (T = 1 when
    greedy).

    Top-k keeps every token at least as likely as the k-th (ties included) and top-p then keeps, of those, the
    likeliest tokens until the ones ranked above hold ``top_p`` of their mass, as transformers' warpers do. Only
    the candidates are sorted: the top k, or for top-p alone the :data:`NUCLEUS_CANDIDATES` likeliest when they
    hold the nucleus.
    """
    logits = logits.float()
    if sampling.greedy:
        token = logits.argmax(dim=-1)
        return token, torch.log_softmax(logits, dim=-1).gather(1, token[:, None]).squeeze(1)
    logprob = torch.log_softmax(logits / sampling.temperature, dim=-1)
    vocab = logprob.shape[-1]
    top_k = sampling.top_k if 0 < sampling.top_k < vocab else 0
    if not top_k and sampling.top_p >= 1.0:
        token = sample_rows(logprob.exp())
    else:
        token = _sample_candidates(logprob, top_k, sampling.top_p)
    return token, logprob.gather(1, token[:, None]).squeeze(1)


def _sample_candidates(logprob: Tensor, top_k: int, top_p: float) -> Tensor:
    """A token per row from the top-k and/or top-p set of [R, V] log-probs (``top_k`` < V, or 0 for none)."""
    vocab = logprob.shape[-1]
    if top_k:
        values, index = torch.topk(logprob, top_k + 1, dim=-1)  # sorted; one extra shows a tie at the cut
        kth = values[:, top_k - 1 : top_k]
        if bool((values[:, top_k] == kth[:, 0]).any()):
            values, index = torch.sort(logprob, dim=-1, descending=True)
        # Renormalised within the kept tokens: top-p then acts on the top-k mass.
        probs = torch.softmax(values.masked_fill(values < kth, float("-inf")), dim=-1)
    else:
        values, index = torch.topk(logprob, min(vocab, NUCLEUS_CANDIDATES), dim=-1)
        probs = values.exp()
        if values.shape[-1] < vocab and bool((probs.sum(dim=-1) < top_p).any()):
            # Some row's nucleus is wider than the candidates: take the whole sorted vocabulary.
            values, index = torch.sort(logprob, dim=-1, descending=True)
            probs = values.exp()
    if top_p < 1.0:
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the best one always stays).
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= top_p, 0.0)
    return index.gather(1, sample_rows(probs)[:, None]).squeeze(1)


def sample_rows(probs: Tensor) -> Tensor:
    """One index per row of [R, V] probabilities, drawn by inverting each row's cumulative sum with one uniform.

    ``torch.multinomial`` draws an exponential variate per vocabulary entry: 1.4 ms for 32 rows of 1,024 and 174 ms
    for 32 rows of 151,936 (a Qwen vocabulary) on the 2-core benchmark machine, against 0.07 and 4 ms here. The
    uniform is scaled by the row's own float32 total, so the sum's rounding moves slot edges by ulps and loses no
    mass, and an entry of probability 0 is never drawn: its cumulative value equals its predecessor's, so its slot
    is empty.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    u = torch.rand(probs.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * total
    # u * total can round up to the total itself (about once in 2^24 draws); the first entry whose cumulative value
    # reaches the total (the last one of positive probability) owns that end of the range.
    last = torch.searchsorted(cdf, total)
    return torch.minimum(torch.searchsorted(cdf, u, right=True), last).squeeze(1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """[N, longest] token ids padded on the left, and the matching 0/1 attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _reusable_layers(cache: DynamicCache) -> list[_ReservedLayer] | None:
    """The cache's layers when every one is a full-attention ``_ReservedLayer`` (the only kind whose keys a prefix
    cache can hold and splice), else None."""
    layers = list(getattr(cache, "layers", None) or [])
    return layers if layers and all(type(layer) is _ReservedLayer for layer in layers) else None


def _remember(
    prefix: PrefixCache,
    layers: Sequence[_ReservedLayer],
    rows: Tensor,
    mask: Tensor,
    sequences: Sequence[Sequence[int]],
    fed: Sequence[int],
) -> None:
    """Store batch rows ``rows``: the first ``fed[i]`` tokens of ``sequences[i]`` (the tokens whose keys the cache
    holds) with those keys, found where ``mask`` is 1 (left and middle padding skipped)."""
    width = layers[0].keys.shape[-2]
    for i, row in enumerate(rows.tolist()):
        count = fed[i]
        if count <= 0:
            continue
        positions = mask[row, :width].nonzero().squeeze(1)[:count]
        kv = [(layer.keys[row][:, positions], layer.values[row][:, positions]) for layer in layers]  # copies
        if not prefix.add(torch.as_tensor(list(sequences[i][:count]), dtype=torch.long), kv):
            return


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    n: int,
    sampling: SamplingConfig,
    end_ids: Sequence[int],
    pad_id: int,
    compact_below: float = 0.75,
    prefix: PrefixCache | None = None,
) -> tuple[list[list[int]], list[bool], list[list[float]]]:
    """``n`` completions per prompt, prompt-major: token ids (up to and including the end token), whether an end
    token was produced, and the behaviour log-prob of each token.

    Args:
        model: A transformers causal LM that takes ``past_key_values``, ``position_ids`` and a 2-D attention mask.
        compact_below: Drop finished rows from the batch once the live ones fall to this fraction of it (each drop
            copies the cache once; until then finished rows keep stepping but nothing of theirs is kept).
        prefix: Keys and values from earlier calls of the same rollout: a prompt that starts like a stored sequence
            computes only the rest, and every sampled row is stored for later calls (``prefix_cache.py``).
    """
    if not prompts:
        return [], [], []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot generate from an empty prompt")
    device = next(model.parameters()).device
    steps = sampling.max_new_tokens
    matches = prefix.match(prompts) if prefix is not None else [(-1, 0)] * len(prompts)
    reused = max(length for _, length in matches)
    # Each row is [left pad | reused keys | pad | rest of the prompt]: the reused part and the rest are each
    # right-aligned, so every prompt's last token sits in the last column; the mask hides both pads.
    rests = [p[length:] for p, (_, length) in zip(prompts, matches)]
    ids, rest_mask = left_pad(rests, pad_id)
    reused_mask = torch.zeros((len(prompts), reused), dtype=torch.long)
    for row, (_, length) in enumerate(matches):
        reused_mask[row, reused - length :] = 1
    ids, mask = ids.to(device), torch.cat([reused_mask, rest_mask], dim=1).to(device)
    width = ids.shape[1]
    positions = ((mask.cumsum(-1) - 1).clamp(min=0))[:, reused:]
    cache = new_cache(model, reserve=steps + width)
    layers = _reusable_layers(cache) if prefix is not None else None
    if reused and layers is not None:
        for layer, (keys, values) in zip(layers, prefix.gather(matches, reused)):  # type: ignore[union-attr]
            layer.update(keys.to(device), values.to(device))
    elif reused:  # a model whose cache cannot take spliced keys: compute every prompt whole
        return sample_completions(model, prompts, n, sampling, end_ids, pad_id, compact_below, None)
    rows = len(prompts) * n
    out = torch.full((rows, steps), pad_id, dtype=torch.long, device=device)
    out_lp = torch.zeros((rows, steps), device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    end = torch.tensor(list(end_ids), dtype=torch.long, device=device)
    slot = torch.arange(rows, device=device)  # the output row of each batch row
    live = torch.ones(rows, dtype=torch.bool, device=device)

    def store(batch_rows: Tensor) -> None:
        """Put these batch rows' prompt + fed completion tokens into ``prefix`` (the last sampled token was never
        fed, so its keys do not exist)."""
        if prefix is None or layers is None or not len(batch_rows):
            return
        slots = slot[batch_rows].tolist()
        done = lengths[slot[batch_rows]].tolist()
        sequences = [list(prompts[s // n]) + out[s, : max(d - 1, 0)].tolist() for s, d in zip(slots, done)]
        fed = [len(prompts[s // n]) + max(d - 1, 0) for s, d in zip(slots, done)]
        _remember(prefix, layers, batch_rows, mask, sequences, fed)

    # The prefill and the decode steps run the linear layers on the CPU's faster kernels (row_linear.py).
    with decode_linears(model):
        if width > 1:
            # Everything but each prompt's last token, once per distinct prompt; the last token opens the decode loop.
            model(
                input_ids=ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=positions[:, :-1],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        if n > 1:
            cache.batch_repeat_interleave(n)
        mask = mask.repeat_interleave(n, dim=0)
        current = ids[:, -1:].repeat_interleave(n, dim=0)
        position = positions[:, -1:].repeat_interleave(n, dim=0)
        for step in range(steps):
            logits = model(
                input_ids=current, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True
            ).logits[:, -1]
            token, logprob = choose_tokens(logits, sampling)
            keep = slot[live]
            out[keep, step] = token[live]
            out_lp[keep, step] = logprob[live]
            lengths[keep] = step + 1
            ended = live & torch.isin(token, end)
            finished[slot[ended]] = True
            live &= ~ended
            alive = int(live.sum())
            if alive == 0 or step == steps - 1:
                break
            current, position = token[:, None], position + 1
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            if alive <= compact_below * len(live):
                store((~live).nonzero().squeeze(1))
                index = live.nonzero().squeeze(1)
                cache.batch_select_indices(index)
                current, position, mask, slot = current[index], position[index], mask[index], slot[index]
                live = torch.ones(alive, dtype=torch.bool, device=device)
    store(torch.arange(len(slot), device=device))
    lengths_list = lengths.tolist()
    out_list, lp_list = out.cpu().tolist(), out_lp.cpu().tolist()
    token_ids = [seq[:length] for seq, length in zip(out_list, lengths_list)]
    logprobs = [lp[:length] for lp, length in zip(lp_list, lengths_list)]
    return token_ids, finished.tolist(), logprobs
