"""`mgrpo test` over two local benchmark files at once; logged metrics checked against the per-problem JSONL; and
one hand-counted benchmark with i→c ≠ c→i through the metric classes, the evaluation hooks and the Table-2 code."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgrpo_pl.cli import cli_main
from mgrpo_pl.evaluation import TwoTurnEvaluation
from mgrpo_pl.metrics import SCALAR_METRICS, SelfCorrectionMetrics, self_correction_collection
from mgrpo_pl.metrics.report import csv_table, load_records, markdown_table, summarize
from mgrpo_pl.rewards import read_final_answer
from mgrpo_pl.rollout.types import EvalBatch

ROOT = Path(__file__).resolve().parents[2]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    gsm = _write(
        d / "gsm.jsonl",
        [
            {"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"He has {i}+2={i + 2}.\n#### {i + 2}"}
            for i in range(5)
        ],
    )
    math = _write(
        d / "math500.jsonl",
        [
            {
                "problem": f"Compute $\\frac{{{i}}}{{2}}$.",
                "solution": "...",
                "answer": f"\\frac{{{i}}}{{2}}",
                "unique_id": f"test/x/{i}.json",
            }
            for i in range(1, 5)
        ],
    )
    return gsm, math


def _test_sets(gsm, math):
    gsm_set = f"{{source: gsm8k, name: gsm, options: {{path: '{gsm}'}}}}"
    math_set = f"{{source: math, name: m500, options: {{path: '{math}'}}}}"
    return f"[{gsm_set}, {math_set}]"


def _expected(records):
    """Table-2 figures counted by hand from the JSONL rows (no library code)."""
    n = len(records)
    c1 = sum(r["correct_t1"] for r in records)
    c2 = sum(r["correct_t2"] for r in records)
    i2c = sum((not r["correct_t1"]) and r["correct_t2"] for r in records)
    c2i = sum(r["correct_t1"] and not r["correct_t2"] for r in records)
    return {"acc_t1": c1 / n, "acc_t2": c2 / n, "delta_i2c": i2c / n, "delta_c2i": c2i / n, "delta": (i2c - c2i) / n}


def _parity_test(tiny_model_path, root, *flags):
    """`mgrpo test` on the tiny config with the parity reward (a random model's turns differ), results under root."""
    args = ["test", "--config", "configs/tiny.yaml", f"--model.model={tiny_model_path}"]
    args += [
        f"--trainer.default_root_dir={root}",
        f"--model.results_dir={root}",
        "--data.reward=plugin_rewards.ParityReward",
    ]
    return cli_main([*args, *flags])


def test_two_benchmarks_logged_metrics_match_the_jsonl(tiny_model_path, bench_files, tmp_path):
    gsm, math = bench_files
    cli = _parity_test(
        tiny_model_path, tmp_path, f"--data.test={_test_sets(gsm, math)}", "--data.rollout.eval_samples=2"
    )
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    for name, n_problems, ids in (("gsm", 5, "gsm:1"), ("m500", 4, "test/x/1.json")):
        files = list(tmp_path.glob(f"test_{name}_step0.jsonl"))
        assert len(files) == 1, list(tmp_path.iterdir())
        records = load_records(files[0])
        assert len(records) == 2 * n_problems  # two samples per problem
        assert records[0]["problem_id"] == ids
        for r in records:  # the reward really scored each turn's text
            assert r["correct_t1"] == (len(r["turn1"]) % 2 == 0)
            # turn 2 is the answer the model ends with: the correction's text when it states an answer, else turn 1's
            # (the value rules of rewards/reading.py, which ParityReward inherits from Reward)
            scored = r["turn2"] if read_final_answer(r["turn2"]) is not None else r["turn1"]
            assert r["answer_t2_from"] == ("turn2" if scored is r["turn2"] else "turn1")
            assert r["correct_t2"] == (len(scored) % 2 == 0)
        for key, value in _expected(records).items():
            assert logged[f"test/{name}/{key}"] == pytest.approx(value, abs=1e-6), (name, key)


def test_eval_table_and_plot_scripts(tiny_model_path, bench_files, tmp_path):
    gsm, math = bench_files
    out = tmp_path / "table"
    cmd = [
        sys.executable,
        "-m",
        "scripts.eval_table",
        "--out",
        str(out),
        "--run",
        "Base=configs/tiny.yaml",
        "--run",
        "Intrinsic=configs/tiny.yaml+configs/baselines/intrinsic.yaml",
        "--",
        f"--model.model={tiny_model_path}",
        f"--data.test={_test_sets(gsm, math)}",
        "--data.reward=plugin_rewards.ParityReward",
    ]
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=ROOT, env={**env, **_inherit()}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| Benchmark | Method | Acc.@t1")
    assert [row.split("|")[1:3] for row in table[2:]] == [
        [" gsm ", " Base "],
        [" gsm ", " Intrinsic "],
        [" m500 ", " Base "],
        [" m500 ", " Intrinsic "],
    ]
    csv_lines = (out / "table.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("benchmark,method,acc_t1")
    intrinsic = load_records(next((out / "Intrinsic").glob("test_gsm_step0.jsonl")))
    assert intrinsic[0]["guide"].startswith("The solution above may contain errors")


def _inherit():
    import os

    keep = ("HOME", "MGRPO_CACHE", "TMPDIR", "LANG", "PYENV_ROOT", "VIRTUAL_ENV")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PATH"] = os.environ["PATH"]
    return env


# 10 problems counted by hand, i→c ≠ c→i so that swapping the two (or their sign in Δ) shows:
#   problem:  0  1  2  3  4  5  6  7  8  9
#   t1:       1  0  1  1  0  1  0  1  1  0   -> 6 right at t1
#   t2:       1  1  0  1  1  1  1  1  1  0   -> 8 right at t2
#   i→c (t1 wrong, t2 right): 1, 4, 6      -> 3
#   c→i (t1 right, t2 wrong): 2            -> 1
#   wrong→wrong: 9; right→right: 0, 3, 5, 7, 8
HAND_T1 = [1, 0, 1, 1, 0, 1, 0, 1, 1, 0]
HAND_T2 = [1, 1, 0, 1, 1, 1, 1, 1, 1, 0]
HAND = {
    "acc_t1": 0.6,  # 6 / 10
    "acc_t2": 0.8,  # 8 / 10
    "delta": 0.2,  # 0.8 - 0.6 = 3/10 - 1/10
    "delta_i2c": 0.3,  # 3 / 10, over ALL problems
    "delta_c2i": 0.1,  # 1 / 10, over ALL problems
    "rate_i2c": 0.75,  # 3 of the 4 wrong at t1
    "rate_c2i": 1 / 6,  # 1 of the 6 right at t1
}


def test_hand_counted_transitions_through_the_metric_classes():
    t1, t2 = torch.tensor(HAND_T1, dtype=torch.bool), torch.tensor(HAND_T2, dtype=torch.bool)
    metric = SelfCorrectionMetrics()
    metric.update(t1[:4], t2[:4])  # two updates: the counts accumulate
    metric.update(t1[4:], t2[4:])
    for key, value in metric.compute().items():
        assert float(value) == pytest.approx(HAND[key], abs=1e-7), key
    for key, cls in SCALAR_METRICS.items():
        one = cls()
        one.update(t1, t2)
        assert float(one.compute()) == pytest.approx(HAND[key], abs=1e-7), key
    collection = self_correction_collection(prefix="val/")
    collection.update(t1, t2)
    assert {k: pytest.approx(float(v), abs=1e-7) for k, v in collection.compute().items()} == {
        f"val/{k}": v for k, v in HAND.items()
    }


class _Evaluated(TwoTurnEvaluation):
    """The evaluation half of MGRPOModule alone: no model, so the Trainer drives only its hooks."""

    def __init__(self, results_dir: str) -> None:
        super().__init__()
        self._init_evaluation(results_dir)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on workers, not about the metrics
def test_hand_counted_transitions_through_evaluation_and_table(tmp_path):
    """``test_step`` / ``on_test_epoch_end`` log the hand-counted values and write the JSONL from which ``report``
    builds Table 2; each figure of the table's row is the hand count, in its own column."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    def eval_batch(rows: range) -> EvalBatch:
        records = [
            {"problem_id": f"p{i}", "sample": 0, "correct_t1": bool(HAND_T1[i]), "correct_t2": bool(HAND_T2[i])}
            for i in rows
        ]
        return EvalBatch(
            problem_ids=[r["problem_id"] for r in records],
            correct_t1=torch.tensor([HAND_T1[i] for i in rows], dtype=torch.bool),
            correct_t2=torch.tensor([HAND_T2[i] for i in rows], dtype=torch.bool),
            records=records,
        )

    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    batches = [eval_batch(range(0, 6)), eval_batch(range(6, 10))]  # two steps of one benchmark
    trainer.test(_Evaluated(str(tmp_path)), dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged == {f"test/set0/{k}": pytest.approx(v, abs=1e-7) for k, v in HAND.items()}

    records = load_records(tmp_path / "test_set0_step0.jsonl")
    assert [r["problem_id"] for r in records] == [f"p{i}" for i in range(10)]
    summary = summarize(records)
    for key, value in HAND.items():
        assert summary[key] == pytest.approx(value, abs=1e-7), key
    assert (summary["n"], summary["samples"]) == (10, 1)

    header, _, row = markdown_table([("bench", "MGRPO", summary)]).splitlines()
    cells = dict(zip(header.strip("|").split(" | "), row.strip("|").split(" | ")))
    assert {k.strip(): v.strip() for k, v in cells.items()} == {
        "Benchmark": "bench",
        "Method": "MGRPO",
        "Acc.@t1": "60.0",
        "Acc.@t2": "80.0",
        "Δ(t1,t2)": "20.0",
        "Δi→c(t1,t2)": "30.0",
        "Δc→i(t1,t2)": "10.0",
    }
    (line,) = csv.DictReader(io.StringIO(csv_table([("bench", "MGRPO", summary)])))
    for key in ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i"):
        assert float(line[key]) == pytest.approx(HAND[key], abs=1e-7), key


def test_three_turn_evaluation_logs_every_pair_from_the_jsonl(tiny_model_path, tmp_path):
    """`mgrpo test` with --data.rollout.eval_turns=3: the JSONL holds turn 3, and every logged figure of the later
    pairs equals a hand count over its rows; the two-turn names keep their meaning."""
    cli = _parity_test(tiny_model_path, tmp_path, "--data.rollout.eval_turns=3", "--data.rollout.eval_samples=4")
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    records = load_records(next(tmp_path.glob("test_arith_test_step0.jsonl")))
    assert len(records) == 16 and all("turn3" in r and "answer_t3_from" in r for r in records)
    n = len(records)
    for key, value in _expected(records).items():  # turns 1 -> 2 under the paper's names
        assert logged[f"test/arith_test/{key}"] == pytest.approx(value, abs=1e-6), key
    assert logged["test/arith_test/acc_t3"] == pytest.approx(sum(r["correct_t3"] for r in records) / n, abs=1e-6)
    for a, b in ((2, 3), (1, 3)):
        i2c = sum((not r[f"correct_t{a}"]) and r[f"correct_t{b}"] for r in records) / n
        c2i = sum(r[f"correct_t{a}"] and not r[f"correct_t{b}"] for r in records) / n
        assert logged[f"test/arith_test/delta_i2c_t{a}_t{b}"] == pytest.approx(i2c, abs=1e-6), (a, b)
        assert logged[f"test/arith_test/delta_c2i_t{a}_t{b}"] == pytest.approx(c2i, abs=1e-6), (a, b)
    header = markdown_table([("arith", "tiny", summarize(records))]).splitlines()[0]
    assert "Acc.@t3" in header and "Δi→c(t2,t3)" in header and "Δc→i(t1,t3)" in header
