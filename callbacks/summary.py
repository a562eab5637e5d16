"""``MetricsSummary``: print the self-correction metrics in a small table when a run ends."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from mgrpo_pl.metrics.report import columns

# The paper's five columns under short titles; past two turns, report.columns adds each later turn's.
_TITLES = {"acc_t1": "Acc@t1", "acc_t2": "Acc@t2", "delta": "Δ", "delta_i2c": "Δi→c", "delta_c2i": "Δc→i"}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Rows keyed by a name, columns Acc@t1, Acc@t2, Δ, Δi→c, Δc→i in percent; then, when a row has later turns
    (``--data.rollout.eval_turns`` > 2), each later turn's accuracy and transitions, blank for rows without them."""
    turns = 2
    while any(f"acc_t{turns + 1}" in values for values in rows.values()):
        turns += 1
    deepest = [values for values in rows.values() if f"acc_t{turns}" in values]
    cols = [(key, _TITLES.get(key, title.replace(".", ""))) for key, title in columns(deepest)]
    width = max(9, *(len(title) + 2 for _, title in cols))
    lines = [f"{'':<28}" + "".join(f"{title:>{width}}" for _, title in cols)]
    for name, values in rows.items():
        cells = [f"{100 * values[key]:.1f}%" if key in values else "" for key, _ in cols]
        lines.append((f"{name:<28}" + "".join(f"{cell:>{width}}" for cell in cells)).rstrip())
    return "\n".join(lines)


def _print_table(rows: dict[str, dict[str, float]]) -> None:
    if rows:
        print(
            "\nSelf-correction metrics (turn 1 -> turn 2, and later turns when evaluated)\n" + format_table(rows),
            flush=True,
        )


def _collect(trainer: Trainer, prefix: str) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for key, value in trainer.callback_metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == prefix:
            rows.setdefault(f"{prefix}/{parts[1]}", {})[parts[2]] = float(value)
    return rows


class MetricsSummary(Callback):
    """Prints Acc@t1, Acc@t2, Δ, Δi→c and Δc→i (and later turns' columns) at the end of fit (training rollouts and
    validation) and test."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows: dict[str, dict[str, float]] = {}
        transitions = getattr(pl_module, "train_transitions", None)
        if transitions is not None and int(transitions.total) > 0:
            # compute() sums the counts over ranks, a collective: every rank calls it, rank 0 prints.
            rows["train rollouts (all steps)"] = {k: float(v) for k, v in transitions.compute().items()}
        if not trainer.is_global_zero:
            return
        rows.update(_collect(trainer, "val"))
        _print_table(rows)

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _print_table(_collect(trainer, "test"))
