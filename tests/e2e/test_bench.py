"""scripts/bench/trl.py end to end on the tiny model: all three parts run and the JSON report is complete.

No timing is asserted (the machines are shared); only that every figure exists and is a positive number.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("trl") is None, reason="needs TRL for the comparison: pip install 'mgrpo_pl[bench]'"
    ),
]

PER_PART = ("steps_per_s", "s_per_step", "generated_tokens_per_s", "trained_tokens_per_s", "peak_rss_bytes")


@pytest.fixture(scope="module")
def report(tmp_path_factory, mgrpo_cache_dir) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "scripts.bench.trl",
        "--model=tiny",
        f"--cache-dir={mgrpo_cache_dir}",
        "--steps=1",
        "--warmup=1",
        "--num-generations=2",
        "--prompts-per-step=2",
        "--max-completion-length=8",
        "--num-corrections=2",
        f"--out={out}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| steps/s |" in proc.stdout  # the Markdown table is printed
    return json.loads(out.read_text())


def test_every_part_reports_positive_figures(report):
    assert set(report["results"]) == {"grpo", "trl", "mgrpo"}
    for part, result in report["results"].items():
        for key in PER_PART:
            assert result[key] > 0, (part, key)
        assert result["steps"] == 1
        assert len(result["loadavg_before"]) == 3


def test_equal_work_counts_real_tokens(report):
    grpo, trl = report["results"]["grpo"], report["results"]["trl"]
    # 2 prompts x 2 samples, at most 8 tokens each: real tokens can never exceed the slots.
    for result in (grpo, trl):
        assert 0 < result["generated_tokens_per_step"] <= 2 * 2 * 8
        assert 0 < result["trained_tokens_per_step"] <= result["generated_tokens_per_step"]
    assert trl["trained_tokens_per_step"] <= trl["completion_slots_per_step"]


def test_comparison_and_layer2_figures(report):
    cmp_ = report["comparison"]
    for key in ("steps_per_s", "generated_tokens_per_s", "trained_tokens_per_s", "peak_rss_bytes"):
        assert cmp_["mgrpo_over_trl"][key] > 0
    assert cmp_["mgrpo_over_grpo_step_time"] > 0
    assert 0 < cmp_["weight_refresh_share_of_step"] < 1
    mgrpo = report["results"]["mgrpo"]
    assert mgrpo["layer2"] is True and mgrpo["share_weights"] is False
    assert mgrpo["weight_refresh_s"] > 0
    assert mgrpo["verified_queries_per_step"] >= mgrpo["kept_queries_per_step"]
    assert set(cmp_["targets"]) >= {"steps_per_s_ratio_ge_1.5", "peak_rss_le_trl", "weight_refresh_le_2pct"}
    assert len(report["loadavg_end"]) == 3
    assert "mgrpo_pl decodes with" in report["cpu"]  # the machine and kernels that the figures belong to
    assert {part: len(runs) for part, runs in report["rounds"].items()} == {"grpo": 1, "trl": 1, "mgrpo": 1}


def test_every_option_reaches_the_part_subprocesses():
    """Each part runs in a child process: every option of the parent must arrive there unchanged (a device or
    precision flag that stayed behind once made a GPU benchmark train on the CPU)."""
    from scripts.bench import trl as bench_trl

    changed = [
        "--model-dir=/m", "--threads=3", "--steps=4", "--warmup=2", "--num-generations=3", "--prompts-per-step=5",
        "--max-completion-length=9", "--num-corrections=6", "--temperature=0.5", "--lr=0.01", "--beta=0.2",
        "--epsilon=0.3", "--micro-batch-tokens=77", "--reward-workers=2", "--seed=7", "--engine=vllm",
        "--device=cuda", "--precision=bf16-mixed", "--l2-pass-rate=0.25", "--mgrpo-checkpointing",
        "--reuse-probe", "--joint-layer2", "--trl-no-checkpointing", "--no-shared-prefix", "--engine-dtype=bfloat16",
        "--plain-mlp", "--reference-dtype=bfloat16", "--no-prefix-cache", "--no-prefix-tree",
        "--layer2-micro-batch-tokens=99", "--max-kept-per-problem=2",
    ]  # fmt: skip
    parent = bench_trl.parse_args(changed)
    defaults = bench_trl.parse_args([])
    orchestration = {"model", "cache_dir", "parts", "repeats", "out", "only", "result", "model_dir"}
    # Every option the parent has must be one this test changes (so a new option cannot slip through untested).
    untested = {k for k in vars(parent) if k not in orchestration and getattr(parent, k) == getattr(defaults, k)}
    assert not untested, f"give these options a non-default value above: {sorted(untested)}"
    child = bench_trl.parse_args(bench_trl._child_argv(parent, "grpo", "/r.json")[3:])
    lost = {k: (getattr(parent, k), getattr(child, k)) for k in vars(parent) if k not in orchestration - {"model_dir"}}
    lost = {k: v for k, v in lost.items() if v[0] != v[1]}
    assert not lost, f"options the part subprocess did not receive (parent, child): {lost}"


def test_paired_ratios_compare_each_round_with_its_neighbour():
    from scripts.bench import trl as bench_trl

    rounds = {
        "grpo": [{"steps_per_s": 0.2}, {"steps_per_s": 0.1}, {"steps_per_s": 0.3}],
        "trl": [{"steps_per_s": 0.1}, {"steps_per_s": 0.1}, {"steps_per_s": 0.1}],
    }
    out = bench_trl.paired_ratios(rounds)
    assert out["steps_per_s_ratio_per_round"] == pytest.approx([1.0, 2.0, 3.0])
    assert out["steps_per_s_ratio_median_round"] == pytest.approx(2.0)
    assert bench_trl.paired_ratios({"grpo": rounds["grpo"][:1], "trl": rounds["trl"][:1]}) == {}
    assert "round by round" in bench_trl.markdown(
        {
            "config": {"model": "m", "num_generations": 2, "prompts_per_step": 1, "max_completion_length": 4,
                       "threads": 1, "steps": 1, "warmup": 0, "repeats": 3, "num_corrections": 2},
            "results": {},
            "rounds": {"grpo": [{"s_per_step": 1.0}]},
            "comparison": out,
        }
    )  # fmt: skip


def test_lora_bench_runs_both_variants_and_reports_their_figures(tiny_model_path):
    from scripts.bench.lora import main

    flags = ["--config", "configs/tiny.yaml", "--model", str(tiny_model_path), "--steps", "2", "--max-new-tokens", "8"]
    results = main(flags)
    assert list(results) == ["full fine-tuning", "LoRA r=16"]
    for name, figures in results.items():
        assert figures["peak_rss_gib"] > 0.1 and figures["step_s"] > 0 and figures["train_s"] > 0, (name, figures)
        assert figures["push_s"] >= 0, (name, figures)
