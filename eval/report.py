"""Evaluation reports: a score table, PNG charts and a markdown file.

::

    rows = [ScoreRow.from_result(hub_run.retriever, r) for r in hub_run.scores.values()]
    write_report(out_dir, rows, title="gorilla-jax evaluation", losses=[(1, 6.9), ...])

writes ``OUT/report.md``, ``OUT/scores.png`` (accuracy / hallucination / error per hub and
retriever, both scoring modes) and, with ``losses``, ``OUT/loss.png``. Charts are drawn with
matplotlib's Agg backend (no display needed); every file is written under a temporary name
and renamed.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

RATES = ("accuracy", "hallucination", "error")


@dataclass
class ScoreRow:
    hub: str
    retriever: str
    mode: str
    n: int
    accuracy: float
    hallucination: float
    error: float

    @classmethod
    def from_result(cls, retriever: str, result) -> "ScoreRow":
        """From an eval.score.ScoreResult."""
        return cls(result.hub, retriever, result.mode, result.n, result.accuracy,
                   result.hallucination, result.error)

    @classmethod
    def from_dict(cls, d: dict) -> "ScoreRow":
        return cls(d["hub"], d["retriever"], d["mode"], int(d["n"]), float(d["accuracy"]),
                   float(d["hallucination"]), float(d["error"]))

    def to_dict(self) -> dict:
        return asdict(self)


def score_table(rows: Sequence[ScoreRow]) -> str:
    """Plain text: one line per hub, retriever and mode."""
    head = ("hub", "retriever", "mode", "n", "accuracy", "hallucination", "error")
    cells = [head] + [(r.hub, r.retriever, r.mode, str(r.n), f"{r.accuracy:.4f}",
                       f"{r.hallucination:.4f}", f"{r.error:.4f}") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def markdown_table(header: Sequence[str], lines: Iterable[Sequence]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ----------------------------------------------------------------------------- charts


def _save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def scores_chart(rows: Sequence[ScoreRow], path: str | os.PathLike) -> Path:
    """Grouped bars: per hub/retriever, accuracy / hallucination / error; one panel per mode."""
    plt = _pyplot()
    modes = list(dict.fromkeys(r.mode for r in rows)) or ["gorilla"]
    groups = max(len(rows) // len(modes), 1)
    fig, axes = plt.subplots(len(modes), 1, figsize=(min(max(6.0, 1.2 * groups + 2), 20),
                                                      3.4 * len(modes)), squeeze=False)
    colors = {"accuracy": "#2a9d8f", "hallucination": "#e76f51", "error": "#e9c46a"}
    for ax, mode in zip(axes[:, 0], modes):
        sel = [r for r in rows if r.mode == mode]
        xs = range(len(sel))
        width = 0.27
        for k, rate in enumerate(RATES):
            vals = [100 * getattr(r, rate) for r in sel]
            bars = ax.bar([x + (k - 1) * width for x in xs], vals, width, label=rate, color=colors[rate])
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.set_xticks(list(xs), [f"{r.hub}\n{r.retriever} (n={r.n})" for r in sel], fontsize=8)
        ax.set_ylim(0, 118)
        ax.set_ylabel("% of responses")
        ax.set_title(f"{mode} scoring")
        ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    fig.tight_layout()
    out = _save_figure(fig, Path(path))
    plt.close(fig)
    return out


def loss_chart(losses: Sequence[tuple], path: str | os.PathLike,
               eval_losses: Sequence[tuple] = ()) -> Path:
    """Training loss per step (and held-out loss when given)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([s for s, _ in losses], [v for _, v in losses], label="train loss", color="#264653")
    if eval_losses:
        ax.plot([s for s, _ in eval_losses], [v for _, v in eval_losses], "o-", label="held-out loss",
                color="#e76f51")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (response tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = _save_figure(fig, Path(path))
    plt.close(fig)
    return out


def read_metrics(run_dir: str | os.PathLike) -> tuple[list, list]:
    """(train losses, eval losses) as (step, value) lists from ``RUN_DIR/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    train, held = [], []
    if not path.is_file():
        return train, held
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "loss" in row:
            train.append((int(row["step"]), float(row["loss"])))
        if "eval_loss" in row:
            held.append((int(row["step"]), float(row["eval_loss"])))
    return train, held


# ----------------------------------------------------------------------------- markdown


def skipped_lines(skipped: dict) -> list:
    """``"<evaluation>: <why>"`` for each evaluation that was not run (printed and reported)."""
    return [f"{what.replace('_', ' ')}: {why}" for what, why in skipped.items()]


def skipped_section(skipped: dict) -> list:
    """The report's "Not evaluated" section, as ``write_report(extra_sections=...)`` takes it;
    none when nothing was skipped."""
    if not skipped:
        return []
    return [("Not evaluated", "\n".join(f"- {line}." for line in skipped_lines(skipped)))]


def write_report(out_dir: str | os.PathLike, rows: Sequence[ScoreRow], *,
                 title: str = "gorilla-jax evaluation", intro: str = "",
                 losses: Sequence[tuple] = (), eval_losses: Sequence[tuple] = (),
                 doc_change: Optional[Sequence] = None, constraints: Optional[Sequence] = None,
                 extra_sections: Sequence[tuple[str, str]] = ()) -> Path:
    """Write ``report.md`` (+ ``scores.png``, ``loss.png``) into ``out_dir``; returns report.md.

    ``doc_change``: eval.doc_change.DocChangeResult list; ``constraints``:
    eval.constraints.ConstraintResult list; ``extra_sections``: (heading, markdown) pairs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro.strip(), ""]
    if rows:
        scores_chart(rows, out / "scores.png")
        modes = {r.mode for r in rows}
        about = ["AST matching against the hub's API database."]
        if "gorilla" in modes:
            about.append("*gorilla* mode reproduces Gorilla's published scoring (a matched API "
                         "of the ground truth's domain is correct).")
        if "strict" in modes:
            about.append("*strict* mode counts only a call to the ground-truth API itself"
                         + ("." if "gorilla" in modes else " (the only mode for your own API "
                            "databases: Gorilla's mode exists for the three APIBench hubs)."))
        parts += ["## Scores", "", " ".join(about), "",
                  markdown_table(("hub", "retriever", "mode", "n", "accuracy", "hallucination",
                                  "error"),
                                 [(r.hub, r.retriever, r.mode, r.n, _pct(r.accuracy),
                                   _pct(r.hallucination), _pct(r.error)) for r in rows]),
                  "", "![scores](scores.png)", ""]
    if losses:
        loss_chart(losses, out / "loss.png", eval_losses)
        first, last = losses[0], losses[-1]
        parts += ["## Training loss", "",
                  f"Step {first[0]}: {first[1]:.4f}; step {last[0]}: {last[1]:.4f}"
                  + (f"; held-out loss at step {eval_losses[-1][0]}: {eval_losses[-1][1]:.4f}"
                     if eval_losses else "") + ".", "", "![loss](loss.png)", ""]
    if doc_change:
        parts += ["## Test-time documentation change", "",
                  "The oracle document of each question is replaced by another API's document "
                  "(the same domain where the database has one, else the same call); a response "
                  "*follows the new document* when it calls that API (strict match).", "",
                  markdown_table(("hub", "edited", "skipped", "follows new doc",
                                  "follows original", "other", "hallucination"),
                                 [(d.hub, d.n, d.skipped, _pct(d.follow_new), _pct(d.follow_original),
                                   _pct(d.other), _pct(d.hallucination)) for d in doc_change]), ""]
    if constraints:
        parts += ["## Constraint-aware questions", "",
                  "Questions built from the API database's `performance` fields (\"fewer than X M "
                  "parameters and at least Y% top-1 accuracy on D\"); a response *satisfies* "
                  "them when the API it calls meets every constraint.", "",
                  markdown_table(("hub", "retriever", "questions", "satisfied", "violated",
                                  "unverifiable API", "hallucination"),
                                 [(c.hub, c.retriever, c.n, _pct(c.satisfied), _pct(c.violated),
                                   _pct(c.unknown), _pct(c.hallucination)) for c in constraints]), ""]
    for heading, body in extra_sections:
        parts += [f"## {heading}", "", body.strip(), ""]
    path = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path
