"""Tests for mgrpo_pl.metrics: hand-worked self-correction numbers, accumulation, forward, Lightning, 2-rank DDP."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mgrpo_pl.metrics import (
    SCALAR_METRICS,
    AccuracyAtT1,
    AccuracyAtT2,
    CorrectToIncorrectRate,
    DeltaCorrectToIncorrect,
    DeltaIncorrectToCorrect,
    DeltaT1T2,
    IncorrectToCorrectRate,
    SelfCorrectionMetrics,
    self_correction_collection,
)

KEYS = ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "rate_i2c", "rate_c2i")

# Worked example, 10 problems, interleaved so no value depends on position:
#   problem:  0  1  2  3  4  5  6  7  8  9
#   t1:       1  0  1  0  1  0  1  0  1  0   -> 5 right at t1
#   t2:       1  1  0  1  1  1  1  0  1  0   -> 7 right at t2
#   i→c (t1=0, t2=1): problems 1, 3, 5       -> 3
#   c→i (t1=1, t2=0): problem 2              -> 1
#   wrong→wrong: 7, 9 ; right→right: 0, 4, 6, 8
T1 = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
T2 = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 1, 0], dtype=torch.bool)
EXPECTED = {
    "acc_t1": 0.5,  # 5 / 10
    "acc_t2": 0.7,  # 7 / 10
    "delta": 0.2,  # 0.7 - 0.5 = 3/10 - 1/10
    "delta_i2c": 0.3,  # 3 / 10 (over ALL problems)
    "delta_c2i": 0.1,  # 1 / 10 (over ALL problems)
    "rate_i2c": 0.6,  # 3 of the 5 wrong at t1
    "rate_c2i": 0.2,  # 1 of the 5 right at t1
}


def _assert_values(values: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert set(values) == set(KEYS)
    for key in KEYS:
        assert values[key].ndim == 0, key
        assert values[key].item() == pytest.approx(expected[key], abs=1e-7), key


def test_worked_example() -> None:
    metric = SelfCorrectionMetrics()
    metric.update(T1, T2)
    values = metric.compute()
    _assert_values(values, EXPECTED)
    # The identity the table relies on holds bit for bit; the accuracy difference within one rounding.
    assert torch.equal(values["delta"], values["delta_i2c"] - values["delta_c2i"])
    assert (values["acc_t2"] - values["acc_t1"]).item() == pytest.approx(values["delta"].item(), abs=1e-7)
    assert int(metric.total) == 10
    assert (int(metric.correct_t1), int(metric.correct_t2), int(metric.i2c), int(metric.c2i)) == (5, 7, 3, 1)


def test_conditional_rates_differ_from_fractions_of_all() -> None:
    # 10 problems: 8 right at t1, 2 wrong.  Of the 2 wrong, 1 fixed (i→c = 1); of the 8 right, 2 broken (c→i = 2).
    t1 = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    t2 = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 0])
    metric = SelfCorrectionMetrics()
    metric.update(t1, t2)
    _assert_values(
        metric.compute(),
        {
            "acc_t1": 0.8,  # 8 / 10
            "acc_t2": 0.7,  # 6 kept + 1 fixed = 7 / 10
            "delta": -0.1,  # 1/10 - 2/10
            "delta_i2c": 0.1,  # 1 / 10
            "delta_c2i": 0.2,  # 2 / 10
            "rate_i2c": 0.5,  # 1 of the 2 wrong at t1
            "rate_c2i": 0.25,  # 2 of the 8 right at t1
        },
    )


def test_rate_with_empty_condition_is_zero() -> None:
    # Every t1 answer right: there is no wrong-at-t1 problem, so rate_i2c is 0/0 -> 0.0; 1 of 4 broken.
    metric = SelfCorrectionMetrics()
    metric.update(torch.ones(4, dtype=torch.bool), torch.tensor([True, False, True, True]))
    values = metric.compute()
    assert values["rate_i2c"].item() == 0.0
    assert values["rate_c2i"].item() == pytest.approx(0.25, abs=1e-7)
    assert values["delta"].item() == pytest.approx(-0.25, abs=1e-7)


def test_empty_is_zero_not_nan() -> None:
    fresh = SelfCorrectionMetrics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about compute before update
        fresh_values = fresh.compute()
    _assert_values(fresh_values, dict.fromkeys(KEYS, 0.0))

    empty_update = SelfCorrectionMetrics()
    empty_update.update(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))
    values = empty_update.compute()
    _assert_values(values, dict.fromkeys(KEYS, 0.0))
    assert not any(torch.isnan(v) for v in values.values())


def test_accumulates_across_updates() -> None:
    metric = SelfCorrectionMetrics()
    # The worked example in three uneven batches (3 + 4 + 3), with int and float 0/1 tensors mixed in.
    metric.update(T1[:3], T2[:3])
    metric.update(T1[3:7].long(), T2[3:7].float())
    metric.update(T1[7:].float(), T2[7:])
    _assert_values(metric.compute(), EXPECTED)
    metric.reset()
    assert int(metric.total) == 0


def test_forward_returns_batch_value_and_accumulates() -> None:
    metric = SelfCorrectionMetrics()
    # Batch a = problems 0..4: t1 = 1 0 1 0 1 (3 right), t2 = 1 1 0 1 1 (4 right); i→c = {1, 3}, c→i = {2}.
    batch_a = metric(T1[:5], T2[:5])
    _assert_values(
        batch_a,
        {
            "acc_t1": 0.6,
            "acc_t2": 0.8,
            "delta": 0.2,
            "delta_i2c": 0.4,  # 2 / 5
            "delta_c2i": 0.2,  # 1 / 5
            "rate_i2c": 1.0,  # both wrong ones fixed
            "rate_c2i": 1 / 3,  # 1 of 3 right broken
        },
    )
    # Batch b = problems 5..9: t1 = 0 1 0 1 0 (2 right), t2 = 1 1 0 1 0 (3 right); i→c = {5}, no c→i.
    batch_b = metric(T1[5:], T2[5:])
    _assert_values(
        batch_b,
        {
            "acc_t1": 0.4,
            "acc_t2": 0.6,
            "delta": 0.2,
            "delta_i2c": 0.2,
            "delta_c2i": 0.0,
            "rate_i2c": 1 / 3,
            "rate_c2i": 0.0,
        },
    )
    # The epoch value is over all 10 problems, not the mean of the two batch values (rate_c2i would be 0.5).
    _assert_values(metric.compute(), EXPECTED)


@pytest.mark.parametrize("key", KEYS)
def test_scalar_subclasses_match_dict(key: str) -> None:
    cls = SCALAR_METRICS[key]
    metric = cls()
    batch = metric(T1[:5], T2[:5])
    assert batch.ndim == 0
    metric.update(T1[5:], T2[5:])
    value = metric.compute()
    assert isinstance(value, torch.Tensor) and value.ndim == 0
    assert value.item() == pytest.approx(EXPECTED[key], abs=1e-7)


def test_scalar_class_names() -> None:
    assert SCALAR_METRICS == {
        "acc_t1": AccuracyAtT1,
        "acc_t2": AccuracyAtT2,
        "delta": DeltaT1T2,
        "delta_i2c": DeltaIncorrectToCorrect,
        "delta_c2i": DeltaCorrectToIncorrect,
        "rate_i2c": IncorrectToCorrectRate,
        "rate_c2i": CorrectToIncorrectRate,
    }
    assert DeltaCorrectToIncorrect.higher_is_better is False
    assert AccuracyAtT2.higher_is_better is True


def test_collection_shares_updates() -> None:
    collection = self_correction_collection(prefix="val/")
    collection.update(T1[:6], T2[:6])
    collection.update(T1[6:], T2[6:])
    values = collection.compute()
    assert set(values) == {f"val/{k}" for k in KEYS}
    for key in KEYS:
        assert values[f"val/{key}"].item() == pytest.approx(EXPECTED[key], abs=1e-7)


def test_rejects_bad_input() -> None:
    metric = SelfCorrectionMetrics()
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="threshold"):
        metric.update(torch.tensor([0.7, 1.0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="correct_t2"):
        metric.update(torch.tensor([1, 0]), torch.tensor([2, 0]))
    assert int(metric.total) == 0  # nothing half-applied by a rejected update


def test_lightning_logging() -> None:
    # Imported here, not at module level: the DDP test's spawned workers re-import this module and lightning
    # would add seconds to each of them.
    import lightning.pytorch as pl

    class _LoggingModule(pl.LightningModule):
        """Logs the metrics the three supported ways during validation on a fixed stream of flags."""

        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.full = SelfCorrectionMetrics()
            self.acc_t2 = AccuracyAtT2()
            self.collection = self_correction_collection(prefix="col/")

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
            t1, t2 = batch
            self.full.update(t1, t2)
            self.acc_t2.update(t1, t2)
            self.log("val/acc_t2", self.acc_t2, on_step=False, on_epoch=True)
            self.collection.update(t1, t2)
            self.log_dict(self.collection, on_step=False, on_epoch=True)

        def on_validation_epoch_end(self) -> None:
            self.log_dict({f"full/{k}": v for k, v in self.full.compute().items()})
            self.full.reset()

    # Two batches of 5 (dataset order = the worked example), so the epoch values are the worked example's.
    data = torch.utils.data.TensorDataset(T1, T2)
    loader = torch.utils.data.DataLoader(data, batch_size=5)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(_LoggingModule(), dataloaders=loader, verbose=False)
    logged = trainer.callback_metrics
    assert logged["val/acc_t2"].item() == pytest.approx(0.7, abs=1e-7)
    for key in KEYS:
        assert logged[f"full/{key}"].item() == pytest.approx(EXPECTED[key], abs=1e-7), key
        assert logged[f"col/{key}"].item() == pytest.approx(EXPECTED[key], abs=1e-7), key


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Each rank sees different, unevenly sized data: rank 0 the first 6 problems, rank 1 the last 4.
_RANK_SLICES = (slice(0, 6), slice(6, 10))


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        part = _RANK_SLICES[rank]
        full = SelfCorrectionMetrics()
        rate = IncorrectToCorrectRate()
        full.update(T1[part], T2[part])
        rate.update(T1[part], T2[part])
        result = {k: v.item() for k, v in full.compute().items()}
        result["single_rate_i2c"] = rate.compute().item()
        result["local_total"] = int(full.total)  # states are unsynced again after compute
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_give_global_value(tmp_path: Path) -> None:
    # The local values differ: rank 0 alone has rate_c2i = 1/3 (problem 2 of right 0, 2, 4), rank 1 alone 0.
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank, part in enumerate(_RANK_SLICES):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for key in KEYS:
            assert result[key] == pytest.approx(EXPECTED[key], abs=1e-7), (rank, key)
        assert result["single_rate_i2c"] == pytest.approx(EXPECTED["rate_i2c"], abs=1e-7)
        assert result["local_total"] == len(range(10)[part])
