"""Checkpoint files are written straight to disk, atomically: the file is the old one or the new one, never a part."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mgrpo_pl.cli import cli_main
from mgrpo_pl.runtime import checkpoint_io
from mgrpo_pl.runtime.checkpoint_io import StreamingCheckpointIO

REPO = Path(__file__).resolve().parents[2]


def test_saves_what_loads_back(tmp_path):
    state = {"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "global_step": 7}
    StreamingCheckpointIO().save_checkpoint(state, tmp_path / "sub" / "a.ckpt")
    loaded = torch.load(tmp_path / "sub" / "a.ckpt", weights_only=True)
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.ckpt"]


def test_a_save_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    StreamingCheckpointIO().save_checkpoint({"step": 1}, target)

    def half_then_fail(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 cut short")  # what a killed or full-disk save leaves
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        StreamingCheckpointIO().save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_mgrpo_runs_write_their_checkpoints_with_it(tiny_model_path, tmp_path):
    args = ["fit", "--config", str(REPO / "configs/tiny.yaml"), f"--model.model={tiny_model_path}"]
    cli = cli_main([*args, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, StreamingCheckpointIO)
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert last.is_symlink() and torch.load(last, weights_only=True)["global_step"] == 3
