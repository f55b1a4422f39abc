"""`gorilla-jax run`: the main job: tokenizer, training, generation, AST scores, report."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="the main job: train a model on APIBench (or your own APIs), generate answers, "
        "score them, report",
        description="Train a tokenizer and a (tiny, by default) LLaMA on retriever-aware APIBench "
        "prompts, checkpoint it, generate answers to the held-out eval questions of each hub "
        "with each retriever it was trained with, score them by AST matching (Gorilla-compatible "
        "and strict), print the score table and write OUT/report.md with the score chart and "
        "the loss curve. Defaults: configs/tiny.yaml on the embedded sample data. With --apis "
        "DB.jsonl the same job runs on your own API database (JSONL of API records with "
        "instructions: `apis import-zoo` keeps the zoo's questions, `data self-instruct "
        "--db-out` adds generated examples): it trains on the "
        "database's train split of instructions and answers its eval split, scored in strict "
        "mode only; the documentation-change and constraint evaluations are APIBench-only and "
        "the report says they were skipped. Re-running with the same --out resumes from the "
        "run's latest checkpoint.",
    )
    p.add_argument("--config", default="tiny", help="config file or name in configs/ (default: tiny)")
    p.add_argument("--out", default="runs/main", help="output directory (default: runs/main)")
    p.add_argument("--data-dir", default=None,
                   help="APIBench data directory (default: data.data_dir, else "
                   "$GORILLA_JAX_DATA_DIR, else the embedded sample)")
    p.add_argument("--hub", default=None,
                   choices=("huggingface", "tensorflowhub", "torchhub", "all"),
                   help="hub(s) to train and evaluate on (default: the config's data.hub)")
    p.add_argument("--apis", default=None, metavar="DB.jsonl",
                   help="train and evaluate on your own API database instead of APIBench (sets "
                   "data.hub=custom and data.apis); scored in strict mode only")
    p.add_argument("--retrievers", default=None,
                   help="comma-separated retrievers to evaluate with (default: those trained "
                   "with, plus eval.retriever), e.g. none,oracle,bm25")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N eval questions of each hub (or of the API "
                   "database's eval split)")
    p.add_argument("--no-extras", action="store_true",
                   help="skip the documentation-change and constraint-aware evaluations "
                   "(APIBench hubs only)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier job in --out first (default: resume it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. train.steps=100 eval.max_new_tokens=64")
    p.set_defaults(func=_run)


def quiet_logs() -> None:
    """Our INFO lines, without the per-file chatter of Orbax/absl."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("jax._src", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax logs every file it touches


def _run(args) -> int:
    from eval.report import skipped_lines
    from gorilla_jax.errors import GorillaError
    from gorilla_jax.main_job import job_config, run_job

    quiet_logs()
    if args.limit is not None and args.limit <= 0:
        raise GorillaError(f"--limit must be positive, got {args.limit}")
    retrievers = None
    if args.retrievers:
        from data_pipeline.retrieval import MODES

        retrievers = [r.strip() for r in args.retrievers.split(",") if r.strip()]
        bad = [r for r in retrievers if r not in MODES]
        if bad:
            raise GorillaError(f"--retrievers: unknown retriever '{bad[0]}'; choose from "
                               f"{', '.join(MODES)}")
    cfg = job_config(args.config, args.overrides, out_dir=args.out, data_dir=args.data_dir,
                     hub=args.hub, apis=args.apis)
    result = run_job(cfg, args.out, retrievers=retrievers, limit=args.limit,
                     extras=not args.no_extras, overwrite=args.overwrite,
                     progress=not args.no_progress)
    print()
    print(result.table)
    for d in result.doc_change:
        print(f"doc change {d.hub}: follows the new document in {100 * d.follow_new:.1f}% of "
              f"{d.n} (original API {100 * d.follow_original:.1f}%, skipped {d.skipped})")
    for c in result.constraints:
        print(f"constraints {c.hub}/{c.retriever}: satisfied {100 * c.satisfied:.1f}% of {c.n}")
    for line in skipped_lines(result.skipped):
        print(line)
    print(f"\nreport: {result.report}\nsummary: {result.summary_path}\n"
          f"wall time: {result.stage_seconds['total']:.0f}s "
          f"(train {result.stage_seconds['train']:.0f}s, evaluate {result.stage_seconds['evaluate']:.0f}s)")
    return 0
