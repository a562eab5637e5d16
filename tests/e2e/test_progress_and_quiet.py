"""What a user sees while a run goes: one progress line per step outside a terminal, with running means that agree
with the end-of-run table, and none of the known harmless library messages unless asked for."""

from __future__ import annotations

import json
import logging
import logging.config
import re
import warnings
from pathlib import Path

import pytest
from resume_runs import scalars

from mgrpo_pl.cli import cli_main
from mgrpo_pl.runtime import quiet

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(
    r"^step (\d+)/3 \| [\d.]+ s \| \d+ gen tok/s \| reward ([\d.]+) \| Acc@t1 ([\d.]+) Acc@t2 ([\d.]+) \| kept (\d+) "
    r"\(running means\)$"
)


def test_one_line_per_step_with_the_running_means_of_the_summary_table(tiny_model_path, tmp_path, capsys):
    flags = [f"--model.model={tiny_model_path}", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3"]
    flags += ["--trainer.enable_progress_bar=true", "--data.reward=plugin_rewards.ParityReward"]
    cli_main(["fit", "--config", str(REPO / "configs/tiny.yaml"), *flags])
    out = capsys.readouterr().out  # not a terminal under pytest: lines, no bar
    lines = [LINE.match(line) for line in out.splitlines() if line.startswith("step ")]
    assert all(lines) and [int(m.group(1)) for m in lines] == [1, 2, 3], out
    # The last line's running means are the table's "train rollouts (all steps)" row, in percent.
    table = next(line for line in out.splitlines() if line.startswith("train rollouts (all steps)"))
    acc_t1, acc_t2 = (float(v.rstrip("%")) for v in table.split()[4:6])
    assert float(lines[-1].group(3)) == pytest.approx(acc_t1 / 100, abs=5e-4)
    assert float(lines[-1].group(4)) == pytest.approx(acc_t2 / 100, abs=5e-4)
    # ... the reward is the mean of the three steps' logged layer-1 rewards, and kept is the last step's.
    logged = scalars(tmp_path / "lightning_logs" / "version_0")
    assert float(lines[-1].group(2)) == pytest.approx(sum(logged["reward/layer1"].values()) / 3, abs=5e-4)
    assert int(lines[-1].group(5)) == int(logged["layer2/kept_queries"][2])
    assert "validation arith_val: batch 1/1" in out.splitlines()  # evaluation shows progress too


def test_known_vllm_warnings_are_dropped_and_others_kept():
    config = quiet.vllm_logging_config()
    logging.config.dictConfig(json.loads(json.dumps(config)))  # as vLLM applies the file
    handler = logging.getLogger("vllm").handlers[0]
    for message in quiet.VLLM_HARMLESS:
        record = logging.LogRecord("vllm.v1.worker", logging.WARNING, "x.py", 1, message + " (detail)", None, None)
        assert not handler.filter(record), message
    real = logging.LogRecord("vllm.v1.core", logging.WARNING, "x.py", 1, "KV cache is too small", None, None)
    assert handler.filter(real)
    assert config["handlers"]["vllm"]["level"] == "WARNING"  # INFO lines (one per weight push) are not shown


def test_known_python_warnings_are_ignored_unless_verbose(monkeypatch):
    message = "`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead"
    for verbose, shown in (("0", 0), ("1", 1)):
        monkeypatch.setenv(quiet.VERBOSE_ENV, verbose)
        monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", "unused")  # no file written by this test
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet.quiet_libraries()
            warnings.warn(message, FutureWarning, stacklevel=1)
            warnings.warn("something new", FutureWarning, stacklevel=1)
        assert [str(w.message) for w in caught].count(message) == shown
        assert "something new" in [str(w.message) for w in caught]
