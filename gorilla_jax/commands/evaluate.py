"""`gorilla-jax evaluate`: generate answers to APIBench eval questions, score them, report."""
from __future__ import annotations

from gorilla_jax.commands import add_cache_windows_argument


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="generate answers to a hub's eval questions with a model and score them",
        description="Load a model (a training run directory, a params checkpoint or an HF "
        "directory), build the eval questions' prompts exactly as the data pipeline does (for a "
        "run: in the prompt format it was trained with), generate in batches, write "
        "OUT/<hub>_<retriever>/responses.jsonl in Gorilla's format, score it in both modes "
        "(gorilla, strict), print the table and write OUT/report.md with a chart. "
        "--doc-change edits the retrieved documents and reports how often the answer follows "
        "the new one; --constraints asks constraint-aware questions built from the API "
        "database's performance fields (both for APIBench hubs only). --hub custom --apis "
        "DB.jsonl answers the eval split of your own API database, scored in strict mode only.",
    )
    p.add_argument("--model", required=True, help="run directory, params checkpoint or HF directory")
    p.add_argument("--hub", required=True, nargs="+",
                   choices=("huggingface", "tensorflowhub", "torchhub", "custom"),
                   help="hub(s) to evaluate; custom: the API database of --apis")
    p.add_argument("--apis", default=None, metavar="DB.jsonl",
                   help="with --hub custom: your API database (default: the data.apis of a run "
                   "directory trained on one); question q is its q-th eval instruction")
    p.add_argument("--retriever", nargs="+", default=["oracle"],
                   choices=("none", "oracle", "bm25", "dense"),
                   help="retriever(s) that supply the documents (default: oracle)")
    p.add_argument("--data-dir", default=None,
                   help="APIBench data directory (default: $GORILLA_JAX_DATA_DIR, else the "
                   "embedded sample)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions per hub")
    p.add_argument("--out", default="runs/eval", help="output directory (default: runs/eval)")
    p.add_argument("--doc-change", action="store_true",
                   help="also run the test-time documentation change evaluation")
    p.add_argument("--constraints", action="store_true",
                   help="also ask constraint-aware questions (per hub and retriever)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per answer (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling / document-change seed")
    p.add_argument("--top-k", type=int, default=1, help="documents per question for bm25/dense")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's own)")
    p.add_argument("--prompt-format", default="auto", choices=("auto", "gorilla", "chat"),
                   help="auto: a run's own format, else the tokenizer's chat template if it has "
                   "one, else ###USER/###ASSISTANT")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="parameter dtype (default: as stored; float32 for HF directories)")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="shard the model and batch over a device mesh, e.g. 1,-1,1 (default: "
                   "fsdp over all devices when there are several)")
    p.add_argument("--model-id", default=None, help="model_id written in the responses")
    add_cache_windows_argument(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _mesh(spec):
    import jax

    from gorilla_jax.config import MeshConfig
    from gorilla_jax.errors import GorillaError
    from gorilla_jax.sharding import make_mesh

    if spec is None:
        return make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1)) if jax.device_count() > 1 else None
    try:
        data, fsdp, tensor = (int(x) for x in spec.split(","))
    except ValueError:
        raise GorillaError(f"--mesh must be DATA,FSDP,TENSOR integers, got {spec!r}") from None
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def _custom_apis(args):
    """The API database for --hub custom: --apis, else the data.apis of a run trained on one."""
    from gorilla_jax.errors import GorillaError

    if "custom" not in args.hub:
        if args.apis:
            raise GorillaError("--apis is only for --hub custom")
        return None
    if args.apis:
        return args.apis
    from gorilla_jax.run_dir import is_run_dir, read_run_config

    if is_run_dir(args.model):
        data = read_run_config(args.model).data
        if data.hub == "custom" and data.apis:
            return data.apis
    raise GorillaError("--hub custom needs --apis DB.jsonl (the API database to evaluate on)")


def evaluate(args) -> dict:
    """Run what the arguments ask; returns the summary written to OUT/summary.json."""
    from pathlib import Path

    from eval.report import ScoreRow, skipped_section, write_report
    from eval.runner import (CUSTOM_HUB_SKIPS, GenerationSettings, check_custom_eval, evaluate_hub,
                             load_eval_model, write_json_atomic)
    from gorilla_jax.errors import GorillaError

    if args.limit is not None and args.limit <= 0:
        raise GorillaError(f"--limit must be positive, got {args.limit}")
    apis = _custom_apis(args)
    custom = check_custom_eval(apis) if apis is not None else None
    settings = GenerationSettings(args.max_new_tokens, args.batch_size, args.temperature,
                                  args.top_p, args.seed).check()
    model = load_eval_model(args.model, tokenizer_path=args.tokenizer,
                            prompt_format=args.prompt_format, dtype=args.dtype,
                            mesh=_mesh(args.mesh), model_id=args.model_id,
                            cache_windows=args.cache_windows)
    out = Path(args.out)
    progress = not args.no_progress
    runs = [evaluate_hub(model, hub, r, out, data_dir=args.data_dir,
                         apis=custom if hub == "custom" else None, limit=args.limit,
                         settings=settings, top_k=args.top_k, progress=progress)
            for hub in args.hub for r in args.retriever]
    rows = [ScoreRow.from_result(run.retriever, result) for run in runs
            for result in run.scores.values()]
    apibench_hubs = [hub for hub in args.hub if hub != "custom"]
    doc, cons = [], []
    if args.doc_change:
        from eval.doc_change import run_doc_change

        doc = [run_doc_change(model, hub, out, data_dir=args.data_dir, limit=args.limit,
                              settings=settings, seed=args.seed, progress=progress)
               for hub in apibench_hubs]
    if args.constraints:
        from eval.constraints import run_constraints

        cons = [run_constraints(model, hub, r, out, data_dir=args.data_dir, limit=args.limit,
                                settings=settings, top_k=args.top_k, progress=progress)
                for hub in apibench_hubs for r in args.retriever]
    skipped = {what: why for what, why in CUSTOM_HUB_SKIPS.items()
               if custom is not None and getattr(args, what)}
    data = [f"data `{args.data_dir or 'default'}`"] if apibench_hubs else []
    if custom is not None:
        data.append(f"API database `{custom.path}` (hub custom, strict scoring only)")
    intro = (f"Model `{args.model}` (prompt format `{model.prompt_format}`), {', '.join(data)}, "
             f"{settings.max_new_tokens} new tokens, "
             + ("greedy decoding." if settings.temperature == 0 else
                f"temperature {settings.temperature}, top-p {settings.top_p}, seed {settings.seed}."))
    report = write_report(out, rows, title="gorilla-jax evaluation", intro=intro,
                          doc_change=doc, constraints=[c for c in cons if c.n],
                          extra_sections=skipped_section(skipped))
    summary = {"model": str(args.model), "prompt_format": model.prompt_format,
               "apis": str(custom.path) if custom is not None else None,
               "scores": [r.to_dict() for r in rows], "runs": [r.summary() for r in runs],
               "doc_change": [d.summary() for d in doc], "constraints": [c.summary() for c in cons],
               "skipped": skipped, "report": str(report)}
    write_json_atomic(out / "summary.json", summary)
    return summary


def _run(args) -> int:
    import json

    from eval.report import ScoreRow, score_table, skipped_lines
    from gorilla_jax.commands.run import quiet_logs

    quiet_logs()
    summary = evaluate(args)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(score_table([ScoreRow.from_dict(r) for r in summary["scores"]]))
    for d in summary["doc_change"]:
        print(f"doc change {d['hub']}: follows the new document {100 * d['rate_new']:.1f}% of "
              f"{d['n']} (original {100 * d['rate_original']:.1f}%, skipped {d['skipped']})")
    for c in (c for c in summary["constraints"] if c["n"]):
        print(f"constraints {c['hub']}/{c['retriever']}: satisfied {100 * c['rate_satisfied']:.1f}% "
              f"of {c['n']}")
    for line in skipped_lines(summary["skipped"]):
        print(line)
    print(f"report: {summary['report']}")
    return 0
