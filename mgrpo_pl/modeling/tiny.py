"""An offline tiny causal LM (random Qwen2 + byte-level BPE tokenizer) for tests and the CPU smoke config.

No model hub is reachable here and no package ships a tiny test model, so both halves are built from code:

* the tokenizer is a byte-level BPE trained in about a second with the `tokenizers` library on a corpus generated
  deterministically below (arithmetic, math word problems with ``\\boxed{}`` answers, the usual instruction phrases,
  common English words). Byte-level means every string round-trips, whatever the corpus missed;
* the model is a randomly initialised 2-layer Qwen2 whose head size (32) the vLLM CPU backend accepts.

Builds are deterministic: the same seed gives bit-identical weights and the same vocabulary, so tests can compare
two builds and two processes racing on the cache produce interchangeable folders.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

__all__ = [
    "CHATML_TEMPLATE",
    "EOS_TOKEN",
    "IM_START_TOKEN",
    "PAD_TOKEN",
    "TINY_VARIANTS",
    "atomic_build_dir",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "default_cache_dir",
    "ensure_tiny_model",
    "tiny_corpus",
]

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
# Ids 0, 1, 2 in this order: pad is kept distinct from eos so that "is this position padding?" never has to be
# guessed from a token that the model also emits as a real end of turn.
SPECIAL_TOKENS = [PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_VOCAB_SIZE = 1024
# Bump when the tokenizer corpus or the model recipe changes: cached folders built by an older recipe are rebuilt.
TINY_RECIPE_VERSION = 1
TINY_VARIANTS = {"tiny": True, "tiny-untied": False}  # variant -> tie_word_embeddings
_MARKER = ".mgrpo_build.json"

_NAMES = ["Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "James", "Kofi", "Lena"]
_ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "cards", "shells", "balloons"]
_WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think say help low line "
    "answer question solution problem step total sum difference product quotient equal equals remainder result "
    "therefore so first second third next finally check verify correct wrong mistake error again careful "
    "number numbers value values half double twice three four five six seven eight nine ten hundred thousand "
    "add subtract multiply divide plus minus times divided less greater fraction percent ratio average area "
    "length width height perimeter angle triangle circle square rectangle radius price cost dollars cents hours "
    "minutes seconds days weeks months speed distance miles meters kilometers buy sell spend save earn pay left "
    "remaining altogether together each every per both many much more fewer most least how what which whose "
    "because since given find compute calculate simplify solve expression equation variable integer positive "
    "negative even odd prime factor multiple digit digits units tens ones place round estimate exactly about "
    "school class teacher student students friend friends family mother father sister brother children garden "
    "store shop market farm baker bakery box boxes bag bags basket baskets table chair book page pages train car "
    "bus bike walk run read wrote bought sold gave gives took takes shared shares split among between into "
    "morning afternoon evening night week weekend today tomorrow yesterday later before after during until while "
    "think let us assume suppose note recall since hence thus then therefore indeed actually wait hmm okay sure "
    "final answer boxed step reasoning reason rewrite clearly accurately identify misunderstanding mistakes above"
).split()
_INSTRUCTIONS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Let's think step by step.",
    "Wait, let me check my answer again.",
    "The solution above may contain errors. Please identify and correct any mistakes.",
    "Let me verify each step of the solution carefully.",
]


def default_cache_dir() -> Path:
    """Where built models are cached: ``$MGRPO_CACHE`` if set, else ``~/.cache/mgrpo_pl``."""
    env = os.environ.get("MGRPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mgrpo_pl"


def _arithmetic_line(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    sym = {"+": "+", "-": "-", "*": "\\times"}[op] if rng.random() < 0.3 else op
    return f"{a} {sym} {b} = {value}"


def _word_problem(rng: random.Random) -> str:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a, b = rng.randint(2, 60), rng.randint(1, 40)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item}. {friend} gives {name} {b} more. How many {item} does {name} have now?"
        work, answer = f"{a} + {b} = {a + b}", a + b
    else:
        a = a + b
        question = f"{name} has {a} {item} and gives {b} of them to {friend}. How many {item} are left?"
        work, answer = f"{a} - {b} = {a - b}", a - b
    return (
        f"{question}\n{rng.choice(_INSTRUCTIONS)}\n"
        f"First, {name} starts with {a} {item}. Then we compute {work}. "
        f"The answer is \\boxed{{{answer}}}."
    )


def _prose_line(rng: random.Random) -> str:
    words = rng.choices(_WORDS, k=rng.randint(6, 16))
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])


def tiny_corpus(num_lines: int = 3000, seed: int = 0) -> Iterator[str]:
    """Yield the tokenizer's training text: a deterministic mix of arithmetic, word problems and prose.

    Args:
        num_lines: how many lines to yield (3000 is about 200 KB).
        seed: seed of the private RNG that draws the numbers and words.
    """
    rng = random.Random(seed)
    makers: list[Callable[[random.Random], str]] = [_arithmetic_line, _word_problem, _prose_line]
    yield from _INSTRUCTIONS
    for i in range(num_lines):
        yield makers[i % len(makers)](rng)


def build_tiny_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer (vocab 1024) and optionally save it.

    Digits are split one per token (as Qwen and Llama 3 do): arithmetic then never depends on which numbers happened
    to be frequent in the corpus. Special tokens: ``<|endoftext|>`` (pad, id 0), ``<|im_start|>`` (id 1) and
    ``<|im_end|>`` (eos, id 2); the ChatML chat template ends every turn with ``<|im_end|>``.

    Args:
        save_dir: if given, the tokenizer files are written there.

    Returns:
        The tokenizer, with left padding (what batched generation needs).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN],
        padding_side="left",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def build_tiny_model(
    save_dir: str | Path | None = None,
    *,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Qwen2ForCausalLM:
    """Build the random tiny Qwen2 causal LM (fp32) and optionally save it with its tokenizer.

    Shape: hidden 64, 2 layers, 2 attention heads of size 32, 2 KV heads (plain multi-head attention, so tensor
    parallelism over 2 ranks can split the KV heads too), MLP 128, 2048 positions, vocabulary = tokenizer size.

    Args:
        save_dir: if given, model, generation config and tokenizer are written there.
        tie_word_embeddings: share the input embedding with the output head (like SmolLM2 and small Qwen models);
            ``False`` exercises the code paths that must handle a separate ``lm_head``.
        seed: weight initialisation seed; the caller's global RNG state is left untouched.
        tokenizer: a tokenizer from :func:`build_tiny_tokenizer`; built when omitted.

    Returns:
        The model in eval mode.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    # fork_rng keeps the build from reseeding whoever called us (a test or a training run mid-way).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    model.eval()
    if save_dir is not None:
        model.save_pretrained(str(save_dir))
        tokenizer.save_pretrained(str(save_dir))
    return model


def _marker_matches(path: Path, recipe: dict) -> bool:
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == recipe
    except (OSError, ValueError):
        return False


def atomic_build_dir(target: Path, recipe: dict, build: Callable[[Path], None]) -> Path:
    """Return ``target`` once it holds a finished build of ``recipe``; build it there if it does not.

    The build writes into a fresh temporary folder beside ``target`` which is then renamed into place. A rename onto
    an existing non-empty folder fails on POSIX, so when two processes race, the first rename wins, the loser drops
    its copy, and nobody ever sees a half-written folder. A folder from an older recipe is swapped out.

    Args:
        target: the cache folder to fill.
        recipe: a JSON-serialisable description of the build; stored as a marker file and compared on reuse.
        build: writes the files into the folder it is given.
    """
    if _marker_matches(target, recipe):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))
    stale = target.parent / f".{target.name}-stale-{uuid.uuid4().hex}"
    try:
        # mkdtemp makes the folder private (0700); a cache is meant to be readable like any other.
        tmp.chmod(0o755)
        build(tmp)
        (tmp / _MARKER).write_text(json.dumps(recipe))
        if target.exists() and not _marker_matches(target, recipe):
            # Stale or unfinished folder: move it aside first (rename is atomic), then delete it.
            try:
                os.rename(target, stale)
            except OSError:
                pass  # another process moved it already
        try:
            os.rename(tmp, target)
        except OSError:
            if not _marker_matches(target, recipe):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return target


def ensure_tiny_model(variant: str = "tiny", cache_dir: str | Path | None = None) -> Path:
    """Build the tiny model once into ``<cache>/<variant>`` and return that folder on every later call.

    Args:
        variant: ``"tiny"`` (tied embeddings) or ``"tiny-untied"``.
        cache_dir: cache root; :func:`default_cache_dir` when omitted.

    Raises:
        ValueError: for an unknown variant.
    """
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny model variant {variant!r}; expected one of {sorted(TINY_VARIANTS)}")
    tied = TINY_VARIANTS[variant]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    recipe = {"kind": "tiny", "recipe_version": TINY_RECIPE_VERSION, "tie_word_embeddings": tied, "seed": 0}
    return atomic_build_dir(root / variant, recipe, lambda d: build_tiny_model(d, tie_word_embeddings=tied, seed=0))
