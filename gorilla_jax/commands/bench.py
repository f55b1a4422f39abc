"""`gorilla-jax bench`: training-step and decoding throughput, JAX against PyTorch, side by side."""
from __future__ import annotations

import json
import sys


def _common(p, default_model: str) -> None:
    p.add_argument("--model", default=default_model,
                   help=f"model preset (config name in configs/ or a YAML path; default {default_model})")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per framework: each worker is pinned to this many CPUs and "
                   "torch.set_num_threads gets it (default: every CPU this process may use)")
    p.add_argument("--out", default=None,
                   help="directory for the JSON result and the PNG chart (default: none written "
                   "for train, runs/bench for compare and generate)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the table (progress goes to stderr)")


def _torch_adamw(p) -> None:
    p.add_argument("--torch-adamw", default="default", choices=("default", "foreach", "fused"),
                   help="PyTorch's AdamW implementation: torch's default (a loop over the tensors "
                   "on CPU, foreach on CUDA), foreach, or "
                   "fused (transformers' Trainer default since torch 2.8); default: default")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="throughput benchmarks against PyTorch",
        description="Measure the training step and KV-cache decoding of the JAX model against "
        "transformers' PyTorch LlamaForCausalLM (eager and torch.compile) with the same config, "
        "weights, batch, optimizer and precision. Each framework runs in its own process; "
        "frameworks are interleaved round by round. Reports step time (median, p10-p90), "
        "tokens/s, TFLOP/s, MFU against a large matmul measured in the same run, and peak memory.")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    sub.required = True

    t = sub.add_parser("train", help="time one framework's training step",
                       description="Time the training step of one framework (jax, torch, "
                       "torch-compile) on a model preset: step time, tokens/s, TFLOP/s, MFU, "
                       "peak memory. --profile writes a profiler trace and lists the top ops.")
    t.add_argument("--framework", required=True, choices=("jax", "torch", "torch-compile"))
    _common(t, "bench_19m")
    t.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's "
                   "train.global_batch_size)")
    t.add_argument("--seq", type=int, default=None, help="sequence length (default: data.seq_len)")
    t.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (default 10)")
    t.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    _torch_adamw(t)
    t.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace steps into DIR (jax.profiler / torch.profiler) and print the "
                   "ops that take the most time")
    t.set_defaults(func=_train)

    c = sub.add_parser("compare", help="JAX vs PyTorch eager vs torch.compile, interleaved",
                       description="Run the frameworks in turn in one invocation (interleaved "
                       "rounds) on the 19M-parameter config by default, print the ratio table and "
                       "write a PNG chart. --json prints one object whose jax_over_torch is JAX "
                       "tokens/s over PyTorch eager tokens/s.")
    _common(c, "bench_19m")
    c.add_argument("--frameworks", default="jax,torch,torch-compile",
                   help="comma-separated (default jax,torch,torch-compile)")
    c.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    c.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    c.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    c.add_argument("--steps", type=int, default=3, help="timed steps per framework per round "
                   "(default 3)")
    c.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default 2)")
    c.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    _torch_adamw(c)
    c.set_defaults(func=_compare)

    g = sub.add_parser("generate", help="KV-cache decode tokens/s vs transformers' generate",
                       description="Greedy decoding of random prompts with the same weights: the "
                       "JAX Generator vs transformers' generate, at each batch size; SmolLM2-135M "
                       "shape, prompt 64 + 128 new tokens by default.")
    _common(g, "smollm2_135m")
    g.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    g.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    g.add_argument("--new-tokens", type=int, default=128, help="generated tokens (default 128)")
    g.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.set_defaults(func=_generate)


def _threads(args) -> int:
    import os

    if args.threads is not None:
        if args.threads < 1:
            from gorilla_jax.errors import GorillaError

            raise GorillaError(f"--threads must be positive, got {args.threads}")
        return args.threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _positive(**values) -> None:
    from gorilla_jax.errors import GorillaError

    for name, v in values.items():
        if v is not None and v < 1:
            raise GorillaError(f"--{name.replace('_', '-')} must be positive, got {v}")


def _train_spec(args, warmup: int = 2):
    from gorilla_jax.bench.train_bench import TrainBenchSpec
    from gorilla_jax.config import load_config

    cfg = load_config(args.model)
    o = cfg.optimizer
    return TrainBenchSpec(model=cfg.model, batch=args.batch or cfg.train.global_batch_size,
                          seq=args.seq or cfg.data.seq_len, precision=args.precision,
                          learning_rate=o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
                          weight_decay=o.weight_decay, grad_clip=o.grad_clip,
                          warmup_steps=warmup, threads=_threads(args),
                          torch_adamw=args.torch_adamw)


def _progress(args):
    return lambda msg: print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)


def _emit(args, result: dict, table: str, name: str, default_out) -> None:
    from gorilla_jax.bench.compare import write_chart, write_json

    out = args.out or default_out
    if out:
        from pathlib import Path

        write_json(result, Path(out) / f"{name}.json")
        chart = write_chart(result, Path(out) / f"{name}.png")
        result["chart"] = str(chart)
    if args.json:
        print(json.dumps(result))
    else:
        print(table)
        if out:
            print(f"wrote {out}/{name}.json and {result['chart']}")


def _train(args) -> int:
    from gorilla_jax.bench.compare import compare_train, train_table

    _positive(batch=args.batch, seq=args.seq, steps=args.steps)
    spec = _train_spec(args)
    result = compare_train(spec, [args.framework], rounds=1, steps_per_round=args.steps,
                           threads=spec.threads, profile_dir=args.profile, progress=_progress(args))
    table = train_table(result)
    prof = result["frameworks"][args.framework].get("profile_top_ops_ms")
    if prof:
        table += f"\n\ntop ops ({args.framework}, ms per step, summed over threads; trace in " \
                 f"{args.profile}):\n" + "\n".join(f"  {ms:9.2f}  {name:<28} {src[-90:]}"
                                                    for name, ms, src in prof)
    _emit(args, result, table, f"train_{args.framework}", None)
    return 0


def _compare(args) -> int:
    from gorilla_jax.bench.compare import compare_train, train_table
    from gorilla_jax.errors import GorillaError

    _positive(batch=args.batch, seq=args.seq, rounds=args.rounds, steps=args.steps)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    bad = [f for f in frameworks if f not in ("jax", "torch", "torch-compile")]
    if bad or not frameworks:
        raise GorillaError(f"--frameworks: unknown {', '.join(bad) or '(none given)'}; choose from "
                           "jax, torch, torch-compile")
    spec = _train_spec(args, warmup=max(args.warmup, 0))
    result = compare_train(spec, frameworks, rounds=args.rounds, steps_per_round=args.steps,
                           threads=spec.threads, progress=_progress(args))
    _emit(args, result, train_table(result), "compare_train", "runs/bench")
    return 0


def _generate(args) -> int:
    from gorilla_jax.bench.compare import compare_decode, decode_table
    from gorilla_jax.bench.decode_bench import DecodeBenchSpec
    from gorilla_jax.config import load_config
    from gorilla_jax.errors import GorillaError

    _positive(prompt_len=args.prompt_len, new_tokens=args.new_tokens, rounds=args.rounds)
    try:
        batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
    except ValueError:
        raise GorillaError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise GorillaError(f"--batches must be positive integers, got {args.batches!r}")
    cfg = load_config(args.model)
    spec = DecodeBenchSpec(model=cfg.model, batches=batches, prompt_len=args.prompt_len,
                           new_tokens=args.new_tokens, dtype=args.dtype, threads=_threads(args))
    result = compare_decode(spec, rounds=args.rounds, threads=spec.threads, progress=_progress(args))
    _emit(args, result, decode_table(result), "compare_decode", "runs/bench")
    return 0
