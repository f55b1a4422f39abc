"""One training step, the same in JAX and in PyTorch: config, weights, batch, optimizer, precision.

- Model: a :class:`~gorilla_jax.config.ModelConfig`; JAX runs the project's own
  ``LlamaForCausalLM`` and train step (``make_train_step`` + ``make_optimizer``, jit with the
  state donated, and on CPU the step's workspace (train/workspace.py) and the native AdamW and
  attention kernels of ``gorilla_jax.cpu_kernels``, as the train loop runs it), PyTorch runs
  transformers' ``LlamaForCausalLM`` (eager, or the model and its loss under ``torch.compile``).
- Weights: one seeded set drawn in numpy under HF tensor names (normal(initializer_range),
  norm scales 1) and loaded into both, so the first step's loss agrees across frameworks.
- Data: ``num_batches`` seeded batches of random token ids [B, S] cycled in the same order;
  next-token targets; every token counts in the loss (mean cross-entropy).
- Optimizer: AdamW with the same learning rate, betas, eps and weight decay, decay skipped on
  norms and embeddings (the project's default mask, applied by name in both) and global-norm
  clipping at ``grad_clip``. PyTorch's AdamW implementation is ``torch_adamw``: ``default``
  (what ``torch.optim.AdamW`` picks by itself: a loop over the tensors on CPU, ``foreach`` on
  CUDA), ``foreach``, or ``fused`` (one pass over each tensor; the default optimizer of transformers'
  Trainer since torch 2.8).
- Precision: ``float32`` (parameters and compute) or ``bfloat16`` (fp32 parameters, bf16
  compute: ``model.dtype`` in JAX, autocast in PyTorch).

A runner's ``setup()`` builds and warms up (the first step includes compilation, reported
apart); ``run(n)`` times ``n`` steps, each waited on (``block_until_ready`` /
``cuda.synchronize``), and returns wall and process-CPU seconds per step and the losses.
FLOPs per step: :func:`gorilla_jax.train.metrics.flops_per_step`.
"""
from __future__ import annotations

import dataclasses
import re
import resource
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from gorilla_jax.config import ModelConfig

FRAMEWORKS = ("jax", "torch", "torch-compile")
TORCH_ADAMW = ("default", "foreach", "fused")  # PyTorch's AdamW implementations
DECAY_EXCLUDE = (r"norm", r"embed_tokens")  # the project's default weight-decay exclusions


@dataclass
class TrainBenchSpec:
    model: ModelConfig
    batch: int = 8
    seq: int = 128
    precision: str = "float32"  # float32 | bfloat16 (fp32 parameters, bf16 compute)
    learning_rate: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 2  # untimed steps after the compiling one
    num_batches: int = 2
    seed: int = 0
    threads: Optional[int] = None  # torch intra-op threads (the worker also pins CPU affinity)
    torch_adamw: str = "default"  # one of TORCH_ADAMW

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainBenchSpec":
        d = dict(d)
        model = d.pop("model")
        if not isinstance(model, ModelConfig):
            from gorilla_jax.config import from_dict

            model = from_dict({"model": model}).model
        return cls(model=model, **d)


def bench_model_config(spec: TrainBenchSpec) -> ModelConfig:
    """The model config the JAX side runs: fp32 parameters, compute dtype from the precision."""
    return dataclasses.replace(spec.model, param_dtype="float32", dtype=spec.precision,
                               scan_layers=False, remat="none")


def numpy_weights(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 weights under HF names: normal(initializer_range), norm weights 1."""
    from gorilla_jax.model import hf_tensor_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = (rng.standard_normal(shape, dtype=np.float32)
                         * np.float32(config.initializer_range))
    return out


def make_batches(spec: TrainBenchSpec) -> list[dict[str, np.ndarray]]:
    """``num_batches`` batches of random tokens: input_ids, targets (next tokens), all-ones mask."""
    rng = np.random.default_rng(spec.seed + 1)
    out = []
    for _ in range(spec.num_batches):
        ids = rng.integers(0, spec.model.vocab_size, (spec.batch, spec.seq + 1), dtype=np.int64)
        out.append({"input_ids": ids[:, :-1].astype(np.int32),
                    "targets": ids[:, 1:].astype(np.int32),
                    "loss_mask": np.ones((spec.batch, spec.seq), np.int32)})
    return out


def decays(hf_name: str) -> bool:
    return not any(re.search(p, hf_name) for p in DECAY_EXCLUDE)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


@dataclass
class StepTimes:
    wall: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    losses: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"wall": self.wall, "cpu": self.cpu, "losses": self.losses}


# ----------------------------------------------------------------------------- JAX


class JaxTrainRunner:
    """The project's train step (model, loss, AdamW, donation) under ``jax.jit``."""

    def __init__(self, spec: TrainBenchSpec):
        self.spec = spec
        self.framework = "jax"
        self.info: dict = {}
        self._i = 0

    def setup(self) -> dict:
        import jax
        import jax.numpy as jnp

        from gorilla_jax.config import OptimizerConfig
        from gorilla_jax.model import LlamaForCausalLM, count_params, hf_to_params
        from gorilla_jax.train.optimizer import make_in_place_update, make_optimizer
        from gorilla_jax.model.layers import dtype_of
        from gorilla_jax.train.step import TrainState, make_train_step
        from gorilla_jax.train.workspace import (JittedTrainStep, logits_workspace,
                                                 uses_logits_workspace)

        spec = self.spec
        rss0 = current_rss_bytes()
        cfg = bench_model_config(spec)
        params = jax.device_put(hf_to_params(numpy_weights(cfg, spec.seed), cfg))
        opt_cfg = OptimizerConfig(learning_rate=spec.learning_rate, schedule="constant",
                                  warmup_steps=0, b1=spec.b1, b2=spec.b2, eps=spec.eps,
                                  weight_decay=spec.weight_decay, grad_clip=spec.grad_clip,
                                  weight_decay_exclude=list(DECAY_EXCLUDE))
        optimizer = make_optimizer(opt_cfg, 1 << 30, params)
        self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=optimizer.init(params), rng=jax.random.PRNGKey(spec.seed))
        step = make_train_step(LlamaForCausalLM(cfg).apply, optimizer,
                               in_place_update=make_in_place_update(opt_cfg, 1 << 30, params))
        B, S = spec.batch, spec.seq
        # as the train loop does: on CPU the step's large arrays live in a donated workspace
        # (train/workspace.py)
        workspace = (logits_workspace(B, S, cfg.vocab_size, dtype_of(cfg.dtype))
                     if uses_logits_workspace(dtype=cfg.dtype) else None)
        self._step = JittedTrainStep(step, workspace)
        segments = np.ones((B, S), np.int32)
        positions = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy()
        self.batches = [jax.device_put({**b, "segment_ids": segments, "positions": positions})
                        for b in make_batches(spec)]
        t0 = time.perf_counter()
        first = self.run(1)
        compile_s = time.perf_counter() - t0
        self.run(spec.warmup_steps)
        device = jax.devices()[0]
        self.info = {"framework": "jax", "device": jax.default_backend(),
                     "device_kind": device.device_kind, "params": count_params(params),
                     "first_step_s": compile_s, "first_loss": first.losses[0],
                     "rss_before_setup_bytes": rss0, "jax_version": jax.__version__}
        return self.info

    def run(self, n: int, untimed: int = 0) -> StepTimes:
        """Time ``n`` steps after ``untimed`` steps (re-warming caches after another process)."""
        import jax

        if untimed:
            self.run(untimed)
        out = StepTimes()
        for _ in range(n):
            batch = self.batches[self._i % len(self.batches)]
            self._i += 1
            c0, t0 = time.process_time(), time.perf_counter()
            self.state, metrics = self._step(self.state, batch)
            loss = float(jax.block_until_ready(metrics["loss"]))
            out.wall.append(time.perf_counter() - t0)
            out.cpu.append(time.process_time() - c0)
            out.losses.append(loss)
        return out

    def memory(self) -> dict:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats and jax.default_backend() != "cpu":
            return {"peak_bytes": int(stats["peak_bytes_in_use"]), "kind": "device"}
        return {"peak_bytes": peak_rss_bytes(), "kind": "rss"}

    def profile(self, n: int, trace_dir: str, top: int = 25) -> list[tuple[str, float, str]]:
        """Trace ``n`` steps with jax.profiler into ``trace_dir``.

        Returns the ``top`` XLA ops by time: (op, thread-ms per step, the JAX operation it came
        from, from the compiled HLO's metadata). The optimized HLO is written beside the trace.
        """
        import jax

        jax.profiler.start_trace(trace_dir)
        try:
            self.run(n)
        finally:
            jax.profiler.stop_trace()
        hlo = self._step.lower(self.state, self.batches[0]).compile().as_text()
        from pathlib import Path

        (Path(trace_dir) / "train_step.hlo.txt").write_text(hlo)
        sources = hlo_op_sources(hlo)
        return [(name, ms, sources.get(name, "")) for name, ms in top_xla_ops(trace_dir, n, top)]


def hlo_op_sources(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its JAX source operation (``metadata op_name``), shortened:
    ``fwd/`` and ``bwd/`` for the model's forward and backward, ``step/`` for the rest."""
    import re

    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"", hlo_text,
                         re.M):
        src = re.sub(r"^jit\([^)]*\)/", "step/", m.group(2))
        src = src.replace("step/transpose(jvp(LlamaForCausalLM))/", "bwd/")
        src = src.replace("step/jvp(LlamaForCausalLM)/", "fwd/")
        out[m.group(1)] = src
    return out


def top_xla_ops(trace_dir: str, steps: int, top: int = 25) -> list[tuple[str, float]]:
    """Sum the XLA op events of a jax.profiler trace: [(op name, thread-ms per step)]."""
    import collections
    from pathlib import Path

    import jax

    files = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    data = jax.profiler.ProfileData.from_file(str(files[-1]))
    totals: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if plane.name == "/host:CPU" and "XLAEigen" not in line.name:
                continue  # on CPU, the XLA ops run on the Eigen pool's threads
            if plane.name != "/host:CPU" and "XLA Ops" not in line.name:
                continue
            for ev in line.events:
                if ev.name.startswith("ThunkExecutor") or "ThreadPool" in ev.name:
                    continue
                totals[ev.name] += ev.duration_ns
    return [(name, ns / 1e6 / max(steps, 1)) for name, ns in totals.most_common(top)]


# ----------------------------------------------------------------------------- PyTorch


class TorchTrainRunner:
    """transformers' LlamaForCausalLM with torch.optim.AdamW, eager or ``torch.compile``."""

    def __init__(self, spec: TrainBenchSpec, compile: bool = False):
        self.spec = spec
        self.compile = compile
        self.framework = "torch-compile" if compile else "torch"
        self.info: dict = {}
        self._i = 0

    def setup(self) -> dict:
        import torch
        import transformers

        from gorilla_jax.convert.hf import config_to_hf_dict

        spec = self.spec
        flush_denormals(torch)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        rss0 = current_rss_bytes()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cfg = dataclasses.replace(spec.model, param_dtype="float32", dtype="float32")
        hf_cfg = transformers.LlamaConfig(**config_to_hf_dict(cfg, "float32"))
        hf_cfg.use_cache = False
        torch.manual_seed(spec.seed)
        model = transformers.LlamaForCausalLM(hf_cfg)
        state = {k: torch.from_numpy(v) for k, v in numpy_weights(cfg, spec.seed).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"torch weights do not match: missing {missing}, unexpected {unexpected}")
        model.to(self.device).train()
        self.model = model
        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if decays(n)], "weight_decay": spec.weight_decay},
                  {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]
        if spec.torch_adamw not in TORCH_ADAMW:
            raise ValueError(f"torch_adamw {spec.torch_adamw!r}: one of {', '.join(TORCH_ADAMW)}")
        impl = {} if spec.torch_adamw == "default" else {spec.torch_adamw: True}
        self.optimizer = torch.optim.AdamW(groups, lr=spec.learning_rate, betas=(spec.b1, spec.b2),
                                           eps=spec.eps, **impl)
        autocast = spec.precision == "bfloat16"

        def loss_fn(input_ids, targets, mask):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=input_ids, use_cache=False).logits
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                   reduction="none")
            m = mask.flatten().float()
            return (ce * m).sum() / m.sum().clamp(min=1.0)

        self._loss = torch.compile(loss_fn) if self.compile else loss_fn
        self.batches = [{k: torch.from_numpy(v.astype(np.int64)).to(self.device)
                         for k, v in b.items()} for b in make_batches(spec)]
        t0 = time.perf_counter()
        first = self.run(1)
        first_s = time.perf_counter() - t0
        self.run(spec.warmup_steps)
        self.info = {"framework": self.framework, "device": "gpu" if self.device.type == "cuda" else "cpu",
                     "device_kind": (torch.cuda.get_device_name() if self.device.type == "cuda"
                                     else "cpu"),
                     "params": sum(p.numel() for p in model.parameters()),
                     "first_step_s": first_s, "first_loss": first.losses[0],
                     "rss_before_setup_bytes": rss0, "torch_threads": torch.get_num_threads(),
                     "torch_adamw": spec.torch_adamw,
                     "torch_version": torch.__version__}
        return self.info

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, n: int, untimed: int = 0) -> StepTimes:
        """Time ``n`` steps after ``untimed`` steps (re-warming caches after another process)."""
        import torch

        if untimed:
            self.run(untimed)
        out = StepTimes()
        for _ in range(n):
            b = self.batches[self._i % len(self.batches)]
            self._i += 1
            c0, t0 = time.process_time(), time.perf_counter()
            loss = self._loss(b["input_ids"], b["targets"], b["loss_mask"])
            loss.backward()
            if self.spec.grad_clip and self.spec.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            self._sync()
            out.wall.append(time.perf_counter() - t0)
            out.cpu.append(time.process_time() - c0)
            out.losses.append(value)
        return out

    def memory(self) -> dict:
        import torch

        if self.device.type == "cuda":
            return {"peak_bytes": int(torch.cuda.max_memory_allocated()), "kind": "device"}
        return {"peak_bytes": peak_rss_bytes(), "kind": "rss"}

    def profile(self, n: int, trace_dir: str, top: int = 25) -> list[tuple[str, float, str]]:
        """torch.profiler over ``n`` steps (a Chrome trace in ``trace_dir``): (op, self CPU ms
        per step, "")."""
        from pathlib import Path

        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            self.run(n)
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(trace_dir) / "torch_trace.json"))
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
        return [(e.key, e.self_cpu_time_total / 1e3 / max(n, 1), "") for e in rows]


def flush_denormals(torch) -> None:
    """Treat subnormal floats as zero in PyTorch's CPU kernels, as XLA:CPU does.

    XLA:CPU flushes subnormals to zero (``jax.jit(lambda x: x * 1.5)(float32(1e-39))`` is 0.0),
    so this gives both sides the same arithmetic and keeps PyTorch off the slow subnormal
    paths. The mode is per thread and inherited by threads created later, so
    this runs before anything starts PyTorch's intra-op thread pool.
    """
    torch.set_flush_denormal(True)


def make_train_runner(framework: str, spec: TrainBenchSpec):
    if framework == "jax":
        return JaxTrainRunner(spec)
    if framework in ("torch", "torch-compile"):
        return TorchTrainRunner(spec, compile=framework == "torch-compile")
    raise ValueError(f"unknown framework {framework!r}: one of {', '.join(FRAMEWORKS)}")
