"""`mgrpo test` over two local benchmark files at once; logged metrics checked against the per-problem JSONL."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mgrpo_pl.cli import cli_main
from mgrpo_pl.report import load_records

ROOT = Path(__file__).parent.parent


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


def test_two_benchmarks_logged_metrics_match_the_jsonl(tiny_model_path, bench_files, tmp_path):
    gsm, math = bench_files
    cli = cli_main(
        [
            "test",
            "--config",
            "configs/tiny.yaml",
            f"--model.model={tiny_model_path}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.results_dir={tmp_path}",
            f"--data.test={_test_sets(gsm, math)}",
            "--data.reward=plugin_rewards.ParityReward",
            "--data.rollout.eval_samples=2",
        ]
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
            assert r["correct_t2"] == (len(r["turn2"]) % 2 == 0)
        for key, value in _expected(records).items():
            assert logged[f"test/{name}/{key}"] == pytest.approx(value, abs=1e-6), (name, key)


def test_eval_table_and_plot_scripts(tiny_model_path, bench_files, tmp_path):
    gsm, math = bench_files
    out = tmp_path / "table"
    cmd = [
        sys.executable,
        "scripts/eval_table.py",
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
