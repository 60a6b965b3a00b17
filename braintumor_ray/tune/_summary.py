"""The search's summary as the job prints it."""

from __future__ import annotations

from typing import Any

from ._run import format_leaderboard


def format_summary(s: dict[str, Any]) -> str:
    """``run_search``'s summary: the budget ASHA saved, the leaderboard, the best trial's metrics."""
    lines = [
        f"search {s['search']}: {s['trials']} trials, {s['trial_epochs_run']} of {s['trial_epochs_budget']} "
        f"trial-epochs run (ASHA saved {s['asha_saved_fraction']:.0%}), {s['wall_s']:.0f} s",
        "",
        format_leaderboard(s["leaderboard"]),
        "",
        f"best: {s['best_trial']['trial']} ({s['best_trial']['backbone']}), val macro-F1 {s['val']['macro_f1']:.3f}",
    ]
    for split in ("test", "test_clean"):
        if split in s:
            lines.append(
                f"  {split:<10} n={s[split]['n']:<5} accuracy {s[split]['accuracy']:.3f}  "
                f"macro-F1 {s[split]['macro_f1']:.3f}"
            )
    lines.append(f"  model: {s['model']['uri']} ({s['model']['model_id']})")
    if s.get("ensemble"):
        e = s["ensemble"]
        lines.append(
            f"ensemble of trials {', '.join(e['trials'])}: val macro-F1 {e['val']['macro_f1']:.3f}"
            + "".join(f", {k} accuracy {e[k]['accuracy']:.3f}" for k in ("test", "test_clean") if k in e)
        )
        lines.append(f"  model: {e['model']['uri']} ({e['model']['model_id']})")
    lines.append(f"  leaderboard: {s['search']}/leaderboard.md, plot: {s['search']}/val_macro_f1.png")
    if s.get("report"):
        lines.append(f"  report: {s['report']}")
    return "\n".join(lines)
