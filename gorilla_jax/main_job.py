"""The main job (``gorilla-jax run``): tokenizer -> training -> generation -> AST scores -> report.

::

    cfg = job_config("tiny", ["train.steps=50"], out_dir="runs/main")
    result = run_job(cfg, "runs/main")
    print(result.table)

On the embedded APIBench-format sample by default (``configs/tiny.yaml``): a sentencepiece
tokenizer is trained on the training texts, a tiny LLaMA is trained on retriever-aware prompts
(``data.retriever_probs``) with Orbax checkpoints, the model is reloaded from its run directory
(as ``gorilla-jax evaluate`` would) and answers the held-out eval questions of each hub under
each retriever, the answers are scored by AST matching in both modes, and a report with the
score chart and the loss curve is written. With ``data.data_dir`` pointing at APIBench and
``data.hub`` a hub, the same job runs on the real data.

**Your own APIs** (``data.hub=custom`` with ``data.apis=DB.jsonl``; ``gorilla-jax run --apis``):
the same job on an API database (:mod:`data_pipeline.custom_hub`: an API Zoo import, a Python
package, self-instructed pairs). It trains on the database's train split of instructions and
answers its eval split, with retrievers over its records; the answers are scored in strict mode
only (function name plus required arguments; Gorilla's mode exists only for the three APIBench
hubs). The documentation-change and constraint evaluations are APIBench-only: for a custom hub
they are skipped and the report and summary say why (``eval.runner.CUSTOM_HUB_SKIPS``).

Layout of ``OUT``::

    run/                         the training run (config.yaml, metrics.jsonl, checkpoints/,
                                 tokenizer/, tensorboard/)
    eval/<hub>_<retriever>/      responses.jsonl (Gorilla format), details_*.jsonl, scores.json
    eval/<hub>_doc_change/       test-time documentation change (oracle documents edited)
    eval/<hub>_oracle_constraints/  constraint-aware questions (hubs whose database has metrics)
    (eval/custom_<retriever>/    for data.hub=custom: responses.jsonl, details_strict.jsonl, ...)
    report.md, scores.png, loss.png, summary.json

Re-running with the same ``OUT`` resumes training from the latest checkpoint (a finished run
goes straight to evaluation); ``overwrite=True`` starts afresh.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from gorilla_jax.config import Config, load_config
from gorilla_jax.errors import GorillaError

log = logging.getLogger(__name__)
DEFAULT_OUT = "runs/main"


def job_config(config: str = "tiny", overrides: Sequence[str] = (), *, out_dir: str = DEFAULT_OUT,
               data_dir: Optional[str] = None, hub: Optional[str] = None,
               apis: Optional[str] = None) -> Config:
    """The job's config: the file plus overrides, with the run directory inside ``out_dir``.
    ``apis``: an API database; sets ``data.hub=custom`` and ``data.apis``."""
    extra = [f"train.run_dir={Path(out_dir) / 'run'}"]
    if data_dir is not None:
        extra.append(f"data.data_dir={data_dir}")
    if apis is not None:
        if hub not in (None, "custom"):
            raise GorillaError(f"--apis trains on your own API database (data.hub=custom); it "
                               f"cannot be combined with --hub {hub}")
        hub = "custom"
        extra.append(f"data.apis={json.dumps(str(apis))}")  # quoted: any path stays a string
    if hub is not None:
        extra.append(f"data.hub={hub}")
    return load_config(config, [*overrides, *extra])


def check_job_data(cfg: Config):
    """Check ``data.hub`` (and for ``custom`` its API database) before anything is trained;
    returns the CustomHub for ``custom``, else None."""
    from data_pipeline.layout import HUBS

    hub = cfg.data.hub
    if hub == "custom":
        if not cfg.data.apis:
            raise GorillaError("config key 'data.apis' is not set: data.hub=custom trains and "
                               "evaluates on your own API database; give it with --apis DB.jsonl "
                               "or data.apis=PATH")
        from data_pipeline.custom_hub import load_custom_hub
        from eval.runner import check_custom_eval

        custom = load_custom_hub(cfg.data.apis, skip_malformed=cfg.data.skip_malformed)
        if not custom.examples("train", synthesize=cfg.data.synthesize_from_docs):
            raise GorillaError(f"{custom.path}: no training instructions in this API database "
                               "(no 'questions' or 'examples' in its train split); generate some "
                               "with `gorilla-jax data self-instruct`")
        return check_custom_eval(custom)
    if hub not in (*HUBS, "all"):
        raise GorillaError(f"config key 'data.hub' is {hub!r}: the main job trains and "
                           f"evaluates on {', '.join(HUBS)}, all, or custom (with data.apis)")
    return None


def job_hubs(cfg: Config) -> tuple[str, ...]:
    from data_pipeline.layout import HUBS

    return HUBS if cfg.data.hub == "all" else (cfg.data.hub,)


def job_retrievers(cfg: Config) -> tuple[str, ...]:
    """The retrievers the model was trained with, and ``eval.retriever``, in a fixed order."""
    from data_pipeline.retrieval import MODES

    wanted = {m for m, p in cfg.data.retriever_probs.items() if p > 0} | {cfg.eval.retriever}
    return tuple(m for m in MODES if m in wanted)


@dataclass
class JobResult:
    out_dir: Path
    run_dir: Path
    rows: list  # eval.report.ScoreRow
    losses: list  # (step, loss)
    report: Path
    summary_path: Path
    stage_seconds: dict = field(default_factory=dict)
    hub_runs: list = field(default_factory=list)
    doc_change: list = field(default_factory=list)
    constraints: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # evaluation -> why it was not run

    @property
    def table(self) -> str:
        from eval.report import score_table

        return score_table(self.rows)


def _prepare_out(out: Path, cfg: Config, overwrite: bool) -> None:
    run_dir = Path(cfg.train.run_dir)
    if out.exists() and overwrite:
        if not ((out / "summary.json").is_file() or (run_dir / "config.yaml").is_file()
                or not any(out.iterdir())):
            raise GorillaError(f"{out}: exists and does not look like a gorilla-jax job "
                               "directory (no summary.json or run/config.yaml); not removing it")
        shutil.rmtree(out)
    if (run_dir / "config.yaml").is_file():
        old = load_config(run_dir / "config.yaml")
        if old.model != cfg.model or old.data != cfg.data:
            raise GorillaError(f"{run_dir}: holds a run of another model or data config; pass "
                               "--overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def _loss_curve(run_dir: Path, losses: list) -> list:
    """Every step's loss from this invocation, earlier steps from metrics.jsonl (a resumed run)."""
    from eval.report import read_metrics

    logged, _ = read_metrics(run_dir)
    first = losses[0][0] if losses else None
    earlier = [(s, v) for s, v in logged if first is None or s < first]
    return sorted(dict(earlier + list(losses)).items())


def run_job(cfg: Config, out_dir: str = DEFAULT_OUT, *, retrievers: Optional[Sequence[str]] = None,
            limit: Optional[int] = None, extras: bool = True, overwrite: bool = False,
            progress: bool = True, echo: Callable[[str], None] = print) -> JobResult:
    """Run the whole job (see the module docstring); ``echo`` receives the progress lines."""
    import jax

    from eval.doc_change import run_doc_change
    from eval.report import ScoreRow, read_metrics, skipped_lines, skipped_section, write_report
    from eval.runner import CUSTOM_HUB_SKIPS, GenerationSettings, evaluate_hub, load_eval_model
    from gorilla_jax.train.data import make_data_factory, resolve_tokenizer
    from gorilla_jax.train.loop import train

    custom = check_job_data(cfg)
    database = None  # what the report and summary say about a custom hub's API database
    if custom is not None:
        database = {"path": str(custom.path), "sha256": custom.db.sha256, "apis": len(custom),
                    "train_instructions": len(custom.examples(
                        "train", synthesize=cfg.data.synthesize_from_docs)),
                    "eval_instructions": len(custom.examples("eval"))}
    out = Path(out_dir)
    run_dir = Path(cfg.train.run_dir)
    _prepare_out(out, cfg, overwrite)
    hubs = job_hubs(cfg)
    retrievers = tuple(retrievers or job_retrievers(cfg))
    limit = limit or cfg.eval.limit
    stages: dict[str, float] = {}
    t_start = time.perf_counter()

    def stage(name: str, number: int, text: str):
        echo(f"[{number}/4] {text}  (t={time.perf_counter() - t_start:.0f}s)")
        return name

    # 1. tokenizer
    name = stage("tokenizer", 1, "tokenizer: " + (cfg.data.tokenizer or "sentencepiece BPE of "
                                                   f"{cfg.model.vocab_size} pieces on the training texts"))
    t0 = time.perf_counter()
    tokenizer = resolve_tokenizer(cfg)
    stages[name] = time.perf_counter() - t0

    # 2. training
    trained_on = cfg.data.hub if custom is None else f"custom ({custom.path})"
    name = stage("train", 2, f"training {cfg.model.num_hidden_layers}x{cfg.model.hidden_size} LLaMA "
                 f"on {trained_on} ({', '.join(f'{m}={p:g}' for m, p in cfg.data.retriever_probs.items())}"
                 f") for {cfg.train.steps} steps of {cfg.train.global_batch_size}x{cfg.data.seq_len} "
                 f"tokens on {jax.device_count()} {jax.default_backend()} device(s) -> {run_dir}")
    t0 = time.perf_counter()
    factory, eval_batches = make_data_factory(cfg, tokenizer)
    result = train(cfg, factory, eval_batches=eval_batches, progress=progress)
    result.state = None  # evaluation reloads the checkpoint, as `gorilla-jax evaluate` would
    losses = _loss_curve(run_dir, result.losses)
    _, eval_losses = read_metrics(run_dir)
    stages[name] = time.perf_counter() - t0
    if losses:
        echo(f"      loss {losses[0][1]:.4f} (step {losses[0][0]}) -> {losses[-1][1]:.4f} "
             f"(step {losses[-1][0]}); checkpoint step {result.last_checkpoint}  "
             f"(t={time.perf_counter() - t_start:.0f}s)")

    # 3. generation and scoring
    name = stage("evaluate", 3, f"generating answers to the eval questions of {', '.join(hubs)} "
                 f"with retrievers {', '.join(retrievers)}")
    t0 = time.perf_counter()
    mesh = None
    if jax.device_count() > 1:
        from gorilla_jax.sharding import make_mesh

        mesh = make_mesh(cfg.mesh)
    model = load_eval_model(run_dir, mesh=mesh, model_id=f"gorilla-jax-{out.name}")
    e = cfg.eval
    settings = GenerationSettings(e.max_new_tokens, e.batch_size, e.temperature, e.top_p, e.seed)
    eval_dir = out / "eval"
    hub_runs = [evaluate_hub(model, hub, r, eval_dir, data_dir=cfg.data.data_dir,
                             apis=custom if hub == "custom" else None, limit=limit,
                             settings=settings, top_k=cfg.data.top_k, progress=progress)
                for hub in hubs for r in retrievers]
    rows = [ScoreRow.from_result(run.retriever, result) for run in hub_runs
            for result in run.scores.values()]
    doc, cons, skipped = [], [], {}
    if extras and custom is not None:
        skipped = dict(CUSTOM_HUB_SKIPS)
        for line in skipped_lines(skipped):
            echo(f"      {line}")
    elif extras:
        from eval.constraints import run_constraints

        doc = [run_doc_change(model, hub, eval_dir, data_dir=cfg.data.data_dir, limit=limit,
                              settings=settings, seed=e.seed, progress=progress) for hub in hubs]
        cons = [c for c in (run_constraints(model, hub, "oracle", eval_dir,
                                            data_dir=cfg.data.data_dir, limit=limit,
                                            settings=settings, progress=progress) for hub in hubs)
                if c.n]
    stages[name] = time.perf_counter() - t0

    # 4. report
    name = stage("report", 4, f"writing the report to {out}")
    t0 = time.perf_counter()
    if database is not None:
        data_text = (f"the API database `{database['path']}` ({database['apis']} APIs; "
                     f"{database['train_instructions']} training and "
                     f"{database['eval_instructions']} eval instructions; hub `custom`, scored in "
                     "strict mode only)")
    else:
        data_text = f"`{cfg.data.data_dir or 'the embedded sample'}` hub `{cfg.data.hub}`"
    intro = (f"Model: {cfg.model.num_hidden_layers} layers x {cfg.model.hidden_size} hidden, "
             f"vocabulary {cfg.model.vocab_size}, trained {result.final_step} steps "
             f"(batch {cfg.train.global_batch_size} x {cfg.data.seq_len} tokens) on "
             f"{data_text} with prompt format `{cfg.data.prompt_format}`; greedy decoding of at "
             f"most {e.max_new_tokens} new tokens. Run directory: `{run_dir}`.")
    report = write_report(out, rows, title="gorilla-jax main job", intro=intro, losses=losses,
                          eval_losses=eval_losses, doc_change=doc, constraints=cons,
                          extra_sections=skipped_section(skipped))
    stages[name] = time.perf_counter() - t0
    stages["total"] = time.perf_counter() - t_start
    summary = {
        "out_dir": str(out), "run_dir": str(run_dir), "hubs": list(hubs),
        "api_database": database,
        "retrievers": list(retrievers), "train_steps": result.final_step,
        "train_status": result.status,
        "loss_first": losses[0][1] if losses else None, "loss_last": losses[-1][1] if losses else None,
        "scores": [r.to_dict() for r in rows], "runs": [run.summary() for run in hub_runs],
        "doc_change": [d.summary() for d in doc], "constraints": [c.summary() for c in cons],
        "skipped": skipped, "seconds": {k: round(v, 1) for k, v in stages.items()},
    }
    summary_path = out / "summary.json"
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tmp.replace(summary_path)
    return JobResult(out, run_dir, rows, losses, report, summary_path, stages, hub_runs, doc, cons,
                     skipped)
