"""``scripts.bench.trl``'s results: per-round ratios between the parts and the markdown report."""

from __future__ import annotations

import statistics
from typing import Any


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios and target checks from the per-part results."""
    grpo, trl, mgrpo = results.get("grpo"), results.get("trl"), results.get("mgrpo")
    out: dict[str, Any] = {}
    if grpo and trl:
        keys = ("steps_per_s", "generated_tokens_per_s", "trained_tokens_per_s", "peak_rss_bytes", "peak_gpu_bytes")
        out["mgrpo_over_trl"] = {k: _ratio(grpo[k], trl[k]) for k in keys}
        out["targets"] = {
            "steps_per_s_ratio_ge_1.5": out["mgrpo_over_trl"]["steps_per_s"] >= 1.5,
            "peak_rss_le_trl": grpo["peak_rss_bytes"] <= trl["peak_rss_bytes"],
        }
    if mgrpo:
        share = mgrpo["weight_refresh_s"] / mgrpo["s_per_step"]
        out["weight_refresh_share_of_step"] = share
        out.setdefault("targets", {})["weight_refresh_le_2pct"] = share <= 0.02
        if grpo:
            out["mgrpo_over_grpo_step_time"] = mgrpo["s_per_step"] / grpo["s_per_step"]
            # How much more work layer 2 adds; a step-time ratio near these means layer 2 costs what layer 1 does
            # per token, and the rest is the method's own extra work.
            for key in ("generated_tokens_per_step", "trained_tokens_per_step"):
                out[f"mgrpo_over_grpo_{key}"] = mgrpo[key] / grpo[key]
            out["targets"]["mgrpo_step_le_2x_grpo"] = out["mgrpo_over_grpo_step_time"] <= 2.0
    return out


def paired_ratios(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """mgrpo_pl/TRL steps/s of each round against the TRL run right after it: adjacent runs share the machine's
    state, so their spread shows how far the best-round ratio can be trusted."""
    pairs = list(zip(rounds.get("grpo", []), rounds.get("trl", [])))
    if len(pairs) < 2:
        return {}
    ratios = sorted(g["steps_per_s"] / t["steps_per_s"] for g, t in pairs)
    return {"steps_per_s_ratio_per_round": ratios, "steps_per_s_ratio_median_round": statistics.median(ratios)}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The human-readable tables of a report."""
    res, cmp_ = report["results"], report["comparison"]
    grpo, trl, mgrpo = res.get("grpo", {}), res.get("trl", {}), res.get("mgrpo", {})
    gib = 1024**3
    rows = [
        ("steps/s", "steps_per_s", 3, 1),
        ("s/step", "s_per_step", 2, 1),
        ("generated tokens/s (real)", "generated_tokens_per_s", 1, 1),
        ("trained tokens/s", "trained_tokens_per_s", 1, 1),
        ("generated tokens/step", "generated_tokens_per_step", 0, 1),
        ("mean completion length", "completion_len_per_step", 1, 1),
        ("prompt tokens/step", "prompt_tokens_per_step", 0, 1),
        ("peak RSS (GiB)", "peak_rss_bytes", 2, gib),
        ("peak GPU memory (GiB)", "peak_gpu_bytes", 2, gib),
        ("start-up to first step (s)", "startup_s", 1, 1),
    ]
    c = report["config"]
    lines = [
        f"model `{c['model']}` ({_fmt(grpo.get('parameters', trl.get('parameters', 0)) / 1e6, 1)}M params), "
        f"G={c['num_generations']}, {c['prompts_per_step']} prompts/step, max {c['max_completion_length']} tokens, "
        f"{c.get('device', 'cpu')} {c.get('precision', '32-true')}, "
        f"{c['threads']} threads, {c['steps']} measured steps after {c['warmup']} warm-up, "
        f"mgrpo_pl engine `{c.get('engine', 'transformers')}` sampling in "
        f"{c.get('engine_dtype') or 'the policy dtype'}"
        + (f", reference in {c['reference_dtype']} (not equal work)" if c.get("reference_dtype") else ""),
        "",
        f"CPU: {report.get('cpu', 'not recorded')}",
        "",
        "| figure | mgrpo_pl (GRPO) | TRL GRPOTrainer | mgrpo_pl / TRL |",
        "|---|---|---|---|",
    ]
    for label, key, digits, scale in rows:
        a, b = grpo.get(key), trl.get(key)
        a, b = (a / scale if a is not None else None), (b / scale if b is not None else None)
        lines.append(f"| {label} | {_fmt(a, digits)} | {_fmt(b, digits)} | {_fmt(_ratio(a, b))} |")
    if trl:
        lines.append(f"| TRL padded completion slots/step | | {_fmt(trl.get('completion_slots_per_step'), 0)} | |")
    if mgrpo:
        lines += [
            "",
            f"| MGRPO (layer 2, G={c['num_generations']}, H={c['num_corrections']}) | value |",
            "|---|---|",
            f"| s/step (MGRPO) | {_fmt(mgrpo['s_per_step'])} |",
            f"| MGRPO / GRPO step time | {_fmt(cmp_.get('mgrpo_over_grpo_step_time'))} |",
            f"| MGRPO / GRPO generated tokens | {_fmt(cmp_.get('mgrpo_over_grpo_generated_tokens_per_step'))} |",
            f"| MGRPO / GRPO trained tokens | {_fmt(cmp_.get('mgrpo_over_grpo_trained_tokens_per_step'))} |",
            f"| kept layer-2 queries/step (probe reused: {'yes' if c.get('reuse_probe') else 'no'}, "
            f"joint probe+group generation: {'yes' if c.get('joint_layer2') else 'no'}, "
            f"cap per problem: {c.get('max_kept_per_problem') or 'none'}) | "
            f"{_fmt(mgrpo['kept_queries_per_step'], 1)} |",
            f"| verified layer-2 queries/step (before the cap) | {_fmt(mgrpo.get('verified_queries_per_step'), 1)} |",
            f"| layer-2 sequences/step | {_fmt(mgrpo['layer2_sequences_per_step'], 1)} |",
            f"| generated tokens/step | {_fmt(mgrpo['generated_tokens_per_step'], 0)} |",
            f"| weight refresh (s) | {_fmt(mgrpo['weight_refresh_s'], 3)} |",
            f"| weight refresh share of step | {_fmt(100 * cmp_['weight_refresh_share_of_step'])}% |",
        ]
    phases = [(name, r) for name, r in (("GRPO", grpo), (f"MGRPO (H={c['num_corrections']})", mgrpo)) if r]
    if phases:
        lines += [
            "",
            "| mgrpo_pl step (s) | generate | reward | train (ref fwd, policy fwd+bwd, opt) | weight refresh | other |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in phases:
            parts = (r["generate_s_per_step"], r["reward_s_per_step"], r["train_step_s"], r["weight_refresh_s"])
            other = r["s_per_step"] - sum(parts)
            lines.append(
                f"| {name} | "
                + " | ".join(_fmt(x, 3 if i == 3 else 2) for i, x in enumerate(parts))
                + f" | {_fmt(other)} |"
            )
    if trl:
        lines.append(
            f"\nTRL step (s): generate + reward + reference fwd {_fmt(trl['generate_and_score_s_per_step'])}, "
            f"policy fwd/bwd + optimizer + rest {_fmt(trl['s_per_step'] - trl['generate_and_score_s_per_step'])}"
        )
    load = ", ".join(
        f"{part}: {_fmt(r['loadavg_before'][0])} -> {_fmt(r['loadavg_after'][0])}" for part, r in res.items()
    )
    lines += ["", f"machine load (1-min average, before -> after each part): {load}"]
    if c.get("repeats", 1) > 1:
        per_round = "; ".join(
            f"{part}: " + ", ".join(_fmt(r["s_per_step"]) for r in runs) for part, runs in report["rounds"].items()
        )
        lines.append(f"s/step per round (the fastest is reported): {per_round}")
    if "steps_per_s_ratio_per_round" in cmp_:
        per_round = ", ".join(_fmt(r) for r in cmp_["steps_per_s_ratio_per_round"])
        lines.append(
            f"steps/s mgrpo_pl / TRL round by round (sorted): {per_round}; "
            f"median {_fmt(cmp_['steps_per_s_ratio_median_round'])}"
        )
    if "targets" in cmp_:
        lines.append("targets: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in cmp_["targets"].items()))
    return "\n".join(lines)
