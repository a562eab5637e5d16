"""Plot accuracy and transition rates over training steps from a run's TensorBoard logs to a PNG.

    python -m scripts.plot_training runs/demo/lightning_logs/version_0 --out docs/demo_training.png

Left: Acc@t1 and Acc@t2 of each step's rollouts (and of validation, where logged). Right: Δi→c and Δc→i.
Several log folders can be given (e.g. GRPO and MGRPO runs); each gets its own line style.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

PANELS = (
    ("accuracy", ("acc_t1", "acc_t2")),
    ("transitions (fraction of all problems)", ("delta_i2c", "delta_c2i")),
)


def scalars(log_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
        for tag in events.Tags()["scalars"]
    }


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: per-step rollout accuracies over a handful of problems are noisy."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot(log_dirs: list[str], labels: list[str], out: Path, window: int) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = []
    for style, (log_dir, label) in zip(("-", "--", ":", "-."), zip(log_dirs, labels)):
        data = scalars(log_dir)
        for ax, (title, keys) in zip(axes, PANELS):
            for key in keys:
                for tag, (steps, values) in sorted(data.items()):
                    if tag == f"transitions/{key}":
                        ax.plot(steps, smooth(values, window), style, label=f"{label} train {key}")
                        drawn.append(tag)
                    elif tag.startswith("val/") and tag.endswith(f"/{key}"):
                        ax.plot(steps, values, style, marker="o", label=f"{label} {tag}")
                        drawn.append(tag)
            ax.set_title(title)
            ax.set_xlabel("step")
    if not drawn:
        raise SystemExit(f"no transitions/* or val/* scalars found in {log_dirs}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return drawn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dirs", nargs="+", help="TensorBoard log folders (lightning_logs/version_N)")
    parser.add_argument("--labels", nargs="*", help="one label per folder (default: folder names)")
    parser.add_argument("--out", default="training.png")
    parser.add_argument("--window", type=int, default=5, help="moving-average window for per-step values")
    args = parser.parse_args(argv)
    labels = args.labels or [Path(d).name for d in args.log_dirs]
    if len(labels) != len(args.log_dirs):
        parser.error("--labels needs one label per log folder")
    drawn = plot(args.log_dirs, labels, Path(args.out), args.window)
    print(f"wrote {args.out} ({len(drawn)} series)")


if __name__ == "__main__":
    main()
