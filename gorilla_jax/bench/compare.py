"""Run benchmark runners side by side and report: statistics, ratio table, PNG chart, JSON.

Every framework runs in its own worker process (:mod:`gorilla_jax.bench.worker`). After each
worker's set-up (compilation and warm-up steps), the frameworks are *interleaved*: in each of
``rounds`` rounds every worker runs one untimed step (caches re-warmed after the other process)
and ``steps_per_round`` timed steps,
the order rotating from round to round. A machine whose load changes during the run (a shared
CI box) then slows all frameworks alike, and the ratios stay meaningful. Statistics are over
all timed steps: the median is the headline number, p10-p90 the spread. Each JAX ratio is also
given per round (the two frameworks' medians in that round), with the number of rounds that
reach its target: near a target, this shows whether a verdict would hold in another run.

- tokens/s = batch * seq / median step time
- TFLOP/s = :func:`gorilla_jax.train.metrics.flops_per_step` / median step time
- MFU = that / the measured peak (the best large-matmul rate seen in the run, any framework, in
  the benchmark's compute dtype)
- peak memory: each worker's peak RSS on CPU, device peak bytes on GPU/TPU
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from gorilla_jax.bench.decode_bench import DecodeBenchSpec, token_agreement
from gorilla_jax.bench.train_bench import TrainBenchSpec, bench_model_config
from gorilla_jax.bench.worker import WorkerClient

TRAIN_TARGETS = {"torch": 1.3, "torch-compile": 1.2}  # JAX tokens/s over each, issue 7 (CPU)
DECODE_TARGETS = {1: 2.0, 16: 1.5}  # JAX decode tokens/s over transformers' generate


def summarize(values: Sequence[float]) -> dict:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "median": float(np.median(v)), "mean": float(v.mean()),
            "min": float(v.min()), "max": float(v.max()),
            "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def _say(progress: Optional[Callable[[str], None]], msg: str) -> None:
    if progress is not None:
        progress(msg)


def _start_workers(kind: str, frameworks: Sequence[str], spec: dict, threads: Optional[int],
                   progress) -> tuple[dict, dict]:
    workers, infos = {}, {}
    try:
        for fw in frameworks:
            _say(progress, f"[{fw}] setting up (build, compile, warm-up)...")
            w = WorkerClient(kind, fw, spec, threads=threads)
            workers[fw] = w
            t0 = time.perf_counter()
            infos[fw] = w.call("setup")
            _say(progress, f"[{fw}] ready in {time.perf_counter() - t0:.1f} s")
    except BaseException:
        for w in workers.values():
            w.close()
        raise
    return workers, infos


def _rotate(items: Sequence, r: int) -> list:
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


# ----------------------------------------------------------------------------- train


def compare_train(spec: TrainBenchSpec, frameworks: Sequence[str] = ("jax", "torch", "torch-compile"),
                  rounds: int = 5, steps_per_round: int = 3, threads: Optional[int] = None,
                  peak_repeats: int = 3, profile_dir: Optional[str] = None,
                  progress: Optional[Callable[[str], None]] = print) -> dict:
    """Interleaved training-step benchmark; returns the result dict (see :func:`train_table`)."""
    from gorilla_jax.model import abstract_params, count_params
    from gorilla_jax.train.metrics import flops_per_step

    cfg = bench_model_config(spec)
    flops = flops_per_step(cfg, spec.batch, spec.seq)
    tokens = spec.batch * spec.seq
    load_start = _load()
    spec_dict = {**spec.to_dict(), "threads": threads}
    workers, infos = _start_workers("train", frameworks, spec_dict, threads, progress)
    times = {fw: {"wall": [], "cpu": [], "losses": []} for fw in frameworks}
    round_medians = {fw: [] for fw in frameworks}
    peaks = {fw: [] for fw in frameworks}
    profiles = {}
    try:
        for fw in frameworks:
            peaks[fw].append(workers[fw].call("peak", repeats=peak_repeats,
                                              dtype=spec.precision)["flops_per_sec"])
        for r in range(rounds):
            for fw in _rotate(list(frameworks), r):
                out = workers[fw].call("run", n=steps_per_round, untimed=1)
                for k in times[fw]:
                    times[fw][k].extend(out[k])
                round_medians[fw].append(float(np.median(out["wall"])))
            _say(progress, f"round {r + 1}/{rounds}: " + ", ".join(
                f"{fw} {1e3 * np.median(times[fw]['wall']):.1f} ms" for fw in frameworks)
                + f" (load {_load()[0] if _load() else '?'})")
        for fw in frameworks:
            peaks[fw].append(workers[fw].call("peak", repeats=peak_repeats,
                                              dtype=spec.precision)["flops_per_sec"])
        if profile_dir:
            for fw in frameworks:
                sub = str(Path(profile_dir) / fw)
                profiles[fw] = workers[fw].call("profile", n=steps_per_round, trace_dir=sub)
        memory = {fw: workers[fw].call("memory") for fw in frameworks}
    finally:
        for w in workers.values():
            w.close()
    peak = max(max(p) for p in peaks.values())
    result = {
        "benchmark": "train",
        "model": {"params": count_params(abstract_params(cfg)), "vocab_size": cfg.vocab_size,
                  "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                  "num_hidden_layers": cfg.num_hidden_layers,
                  "num_attention_heads": cfg.num_attention_heads,
                  "num_key_value_heads": cfg.num_key_value_heads,
                  "tie_word_embeddings": cfg.tie_word_embeddings},
        "batch": spec.batch, "seq": spec.seq, "precision": spec.precision,
        "optimizer": {"name": "adamw", "learning_rate": spec.learning_rate, "b1": spec.b1,
                      "b2": spec.b2, "eps": spec.eps, "weight_decay": spec.weight_decay,
                      "grad_clip": spec.grad_clip,
                      "torch_adamw": spec.torch_adamw if any(f != "jax" for f in frameworks)
                      else None},
        "device": infos[frameworks[0]].get("device"), "threads": threads,
        "glibc_tunables": _worker_tunables(),
        "rounds": rounds, "steps_per_round": steps_per_round,
        "flops_per_step": flops, "tokens_per_step": tokens,
        "flops_formula": "(6 * N_matmul + 12 * L * S * d_attn) * B * S",
        "load_avg": {"start": load_start, "end": _load()},
        "peak_flops_per_sec": peak,
        "peak_by_framework": {fw: max(p) for fw, p in peaks.items()},
        "frameworks": {},
    }
    for fw in frameworks:
        wall = summarize(times[fw]["wall"])
        med = wall["median"]
        result["frameworks"][fw] = {
            "step_time_s": wall, "round_median_step_s": round_medians[fw],
            "cpu_time_s": summarize(times[fw]["cpu"]),
            "tokens_per_sec": tokens / med, "tflops_per_sec": flops / med / 1e12,
            "mfu": flops / med / peak,
            "peak_memory_bytes": memory[fw]["peak_bytes"], "memory_kind": memory[fw]["kind"],
            "first_step_s": infos[fw].get("first_step_s"), "first_loss": infos[fw].get("first_loss"),
            "last_loss": times[fw]["losses"][-1] if times[fw]["losses"] else None,
            "params": infos[fw].get("params"),
        }
        if fw in profiles:
            result["frameworks"][fw]["profile_top_ops_ms"] = profiles[fw]
    fws = result["frameworks"]
    if "jax" in fws:
        for other, target in TRAIN_TARGETS.items():
            if other in fws:
                ratio = fws["jax"]["tokens_per_sec"] / fws[other]["tokens_per_sec"]
                key = "jax_over_torch" if other == "torch" else "jax_over_torch_compile"
                result[key] = ratio
                # the frameworks ran side by side in each round: one ratio per round shows how
                # far the load's changes move the headline ratio (of the medians of all steps)
                by_round = [o / j for j, o in zip(fws["jax"]["round_median_step_s"],
                                                  fws[other]["round_median_step_s"])]
                result.setdefault("targets", {})[key] = {
                    "target": target, "ratio": ratio, "met": ratio >= target,
                    "ratio_by_round": by_round,
                    "rounds_met": sum(r >= target for r in by_round)}
    return result


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def train_table(result: dict) -> str:
    m = result["model"]
    lines = [
        f"train step: LLaMA {m['params'] / 1e6:.1f}M params (vocab {m['vocab_size']}, hidden "
        f"{m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']}/"
        f"{m['num_key_value_heads']} heads, {'tied' if m['tie_word_embeddings'] else 'untied'}), "
        f"batch {result['batch']} x {result['seq']}, {result['precision']}, AdamW"
        f"{_fmt_torch_adamw(result['optimizer'].get('torch_adamw'))}",
        f"device {result['device']}, threads {result['threads'] or 'default'}, "
        f"{result['rounds']} interleaved rounds x {result['steps_per_round']} steps, load avg "
        f"{_fmt_load(result['load_avg']['start'])} -> {_fmt_load(result['load_avg']['end'])}"
        f"{_fmt_tunables(result)}",
        f"FLOPs/step {result['flops_per_step'] / 1e9:.2f} G = {result['flops_formula']}; measured "
        f"peak {result['peak_flops_per_sec'] / 1e9:.1f} GFLOP/s ({result['precision']} large matmul, "
        f"best in run)",
        "",
        f"{'framework':<14} {'step ms':>8} {'p10-p90 ms':>15} {'cpu-s/step':>10} {'tokens/s':>9} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'peak mem':>10} {'1st step s':>10} {'loss 1st/last':>15}",
    ]
    for fw, r in result["frameworks"].items():
        st = r["step_time_s"]
        lines.append(
            f"{fw:<14} {1e3 * st['median']:>8.1f} {1e3 * st['p10']:>7.1f}-{1e3 * st['p90']:<7.1f} "
            f"{r['cpu_time_s']['median']:>10.3f} {r['tokens_per_sec']:>9.0f} "
            f"{r['tflops_per_sec']:>8.4f} {100 * r['mfu']:>5.1f}% "
            f"{_gib(r['peak_memory_bytes']):>10} {r['first_step_s']:>10.2f} "
            f"{r['first_loss']:>7.4f}/{r['last_loss']:<7.4f}")
    for key, t in result.get("targets", {}).items():
        by_round = t["ratio_by_round"]
        lines.append(f"{key}: {t['ratio']:.2f}x (target {t['target']}x: "
                     f"{'met' if t['met'] else 'NOT met'}; by round {min(by_round):.2f}-"
                     f"{max(by_round):.2f}x, met in {t['rounds_met']} of {len(by_round)})")
    return "\n".join(lines)


def _fmt_torch_adamw(impl) -> str:
    name = "torch's default implementation" if impl == "default" else impl
    return f" (PyTorch's: {name})" if impl else ""


def _worker_tunables() -> str:
    """The GLIBC_TUNABLES every worker runs with (gorilla_jax.host_memory)."""
    from gorilla_jax.host_memory import with_huge_pages

    return with_huge_pages(os.environ).get("GLIBC_TUNABLES", "")


def _fmt_tunables(result: dict) -> str:
    t = result.get("glibc_tunables")
    return f", every worker with GLIBC_TUNABLES={t}" if t else ""


def _fmt_load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


# ----------------------------------------------------------------------------- decode


def compare_decode(spec: DecodeBenchSpec, frameworks: Sequence[str] = ("jax", "torch"),
                   rounds: int = 3, calls_per_round: int = 1, untimed: int = 0,
                   threads: Optional[int] = None,
                   progress: Optional[Callable[[str], None]] = print) -> dict:
    """Interleaved decode benchmark over ``spec.batches``; returns the result dict."""
    load_start = _load()
    spec_dict = {**spec.to_dict(), "threads": threads}
    workers, infos = _start_workers("decode", frameworks, spec_dict, threads, progress)
    times = {(fw, b): [] for fw in frameworks for b in spec.batches}
    cpu = {(fw, b): [] for fw in frameworks for b in spec.batches}
    try:
        for r in range(rounds):
            for b in spec.batches:
                for fw in _rotate(list(frameworks), r):
                    out = workers[fw].call("run", n=calls_per_round, batch=b, untimed=untimed)
                    times[(fw, b)].extend(out["wall"])
                    cpu[(fw, b)].extend(out["cpu"])
            _say(progress, f"round {r + 1}/{rounds}: " + ", ".join(
                f"{fw} b{b} {b * spec.new_tokens / np.median(times[(fw, b)]):.1f} tok/s"
                for b in spec.batches for fw in frameworks) + f" (load {_load()[0] if _load() else '?'})")
        memory = {fw: workers[fw].call("memory") for fw in frameworks}
    finally:
        for w in workers.values():
            w.close()
    m = spec.model
    result = {
        "benchmark": "decode",
        "model": {"vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
                  "num_hidden_layers": m.num_hidden_layers, "num_attention_heads": m.num_attention_heads,
                  "num_key_value_heads": m.num_key_value_heads},
        "prompt_len": spec.prompt_len, "new_tokens": spec.new_tokens, "dtype": spec.dtype,
        "greedy": True, "device": infos[frameworks[0]].get("device"), "threads": threads,
        "glibc_tunables": _worker_tunables(), "rounds": rounds, "load_avg": {"start": load_start, "end": _load()},
        "frameworks": {}, "jax_over_torch": {},
    }
    for fw in frameworks:
        per_batch = {}
        for b in spec.batches:
            wall = summarize(times[(fw, b)])
            per_batch[str(b)] = {"call_time_s": wall, "cpu_time_s": summarize(cpu[(fw, b)]),
                                 "tokens_per_sec": b * spec.new_tokens / wall["median"],
                                 "first_call_s": infos[fw]["first_call_s"][str(b)]}
        result["frameworks"][fw] = {"batches": per_batch,
                                    "peak_memory_bytes": memory[fw]["peak_bytes"],
                                    "memory_kind": memory[fw]["kind"]}
    if "jax" in infos and "torch" in infos:
        for b in spec.batches:
            jb = result["frameworks"]["jax"]["batches"][str(b)]["tokens_per_sec"]
            tb = result["frameworks"]["torch"]["batches"][str(b)]["tokens_per_sec"]
            result["jax_over_torch"][str(b)] = jb / tb
            agree = token_agreement(infos["jax"]["tokens"][str(b)], infos["torch"]["tokens"][str(b)])
            result.setdefault("token_agreement", {})[str(b)] = agree
            if b in DECODE_TARGETS:
                result.setdefault("targets", {})[f"batch_{b}"] = {
                    "target": DECODE_TARGETS[b], "ratio": jb / tb, "met": jb / tb >= DECODE_TARGETS[b]}
    return result


def decode_table(result: dict) -> str:
    m = result["model"]
    lines = [
        f"decode: LLaMA (vocab {m['vocab_size']}, hidden {m['hidden_size']}, "
        f"{m['num_hidden_layers']} layers, {m['num_attention_heads']}/{m['num_key_value_heads']} "
        f"heads), prompt {result['prompt_len']} + {result['new_tokens']} new tokens, greedy, "
        f"{result['dtype']}",
        f"device {result['device']}, threads {result['threads'] or 'default'}, {result['rounds']} "
        f"interleaved rounds, load avg {_fmt_load(result['load_avg']['start'])} -> "
        f"{_fmt_load(result['load_avg']['end'])}{_fmt_tunables(result)}",
        "",
        f"{'framework':<10} {'batch':>5} {'call s':>8} {'p10-p90 s':>15} {'tokens/s':>9} "
        f"{'1st call s':>10} {'peak mem':>10}",
    ]
    for fw, r in result["frameworks"].items():
        for b, s in r["batches"].items():
            w = s["call_time_s"]
            lines.append(f"{fw:<10} {b:>5} {w['median']:>8.3f} {w['p10']:>7.3f}-{w['p90']:<7.3f} "
                         f"{s['tokens_per_sec']:>9.1f} {s['first_call_s']:>10.2f} "
                         f"{_gib(r['peak_memory_bytes']):>10}")
    for b, ratio in result.get("jax_over_torch", {}).items():
        t = result.get("targets", {}).get(f"batch_{b}")
        agree = result.get("token_agreement", {}).get(b)
        line = f"batch {b}: jax/torch {ratio:.2f}x"
        if t:
            line += f" (target {t['target']}x: {'met' if t['met'] else 'NOT met'})"
        if agree is not None:
            line += f"; greedy tokens identical at {100 * agree:.1f}% of positions"
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- outputs


def write_chart(result: dict, path: str | os.PathLike) -> Path:
    """A PNG: tokens/s per framework (and batch, for decode) with the JAX ratios annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    if result["benchmark"] == "train":
        names = list(result["frameworks"])
        vals = [result["frameworks"][n]["tokens_per_sec"] for n in names]
        errs = [[v - result["tokens_per_step"] / result["frameworks"][n]["step_time_s"]["p90"]
                 for n, v in zip(names, vals)],
                [result["tokens_per_step"] / result["frameworks"][n]["step_time_s"]["p10"] - v
                 for n, v in zip(names, vals)]]
        bars = ax.bar(names, vals, yerr=errs, capsize=4,
                      color=["#1f77b4" if n == "jax" else "#ff7f0e" for n in names])
        for bar, n in zip(bars, names):
            r = result["frameworks"][n]
            ax.annotate(f"{r['tokens_per_sec']:.0f} tok/s\nMFU {100 * r['mfu']:.0f}%",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height() / 2),
                        ha="center", va="center", fontsize=9, color="white")
        m = result["model"]
        ax.set_title(f"train step, {m['params'] / 1e6:.0f}M params, batch {result['batch']}x"
                     f"{result['seq']}, {result['precision']} ({result['device']})", fontsize=9)
        ax.set_ylabel("tokens/s (median; bars p10-p90)")
    else:
        fws = list(result["frameworks"])
        batches = list(next(iter(result["frameworks"].values()))["batches"])
        x = np.arange(len(batches))
        width = 0.8 / len(fws)
        for i, fw in enumerate(fws):
            vals = [result["frameworks"][fw]["batches"][b]["tokens_per_sec"] for b in batches]
            bars = ax.bar(x + i * width, vals, width, label=fw)
            for bar, v in zip(bars, vals):
                ax.annotate(f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x + width * (len(fws) - 1) / 2, [f"batch {b}" for b in batches])
        ax.set_ylabel("decode tokens/s (median)")
        ax.set_title(f"greedy decode, prompt {result['prompt_len']} + {result['new_tokens']} "
                     f"tokens, {result['dtype']} ({result['device']})", fontsize=9)
        ax.legend()
    ratios = {k: v for k, v in result.items() if k.startswith("jax_over")}
    text = "; ".join(f"{k} {v:.2f}x" if isinstance(v, float)
                     else f"{k} " + ", ".join(f"b{b} {r:.2f}x" for b, r in v.items())
                     for k, v in ratios.items())
    fig.text(0.01, 0.01, text, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_json(result: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
