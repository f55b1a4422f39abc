"""The training loop: mesh, sharded state, data, jit step, metrics, checkpoints, signals.

``train(cfg)`` runs ``cfg.train.steps`` optimizer steps in ``cfg.train.run_dir``. If the run
directory holds a complete checkpoint, the run resumes from the latest one: parameters,
optimizer state, step, RNG and the data pipeline's position, so the batches are the ones an
uninterrupted run would have seen. SIGTERM (what a TPU preemption sends) saves a checkpoint at
the next step boundary and returns; a non-finite loss stops the run before anything is saved,
so the last checkpoint stays the last good one.

With ``train.async_metrics`` (the default except on CPU) the host does not wait for a step
before dispatching the next: each step's metrics are read after the following step has been
dispatched, so the next batch's host work and transfer overlap the device's compute. Steps
that evaluate, save or stop are read at once, before anything else happens. On CPU the host
and the "device" share the same cores, and the overlap only made them compete (150 steps of
a small model, 7 runs each: median 21.2 s, range 12.5-21.4, against 14.0 s, 11.5-21.2). Logged
tokens/s and MFU use the time between the arrivals of consecutive steps' metrics.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from gorilla_jax import sharding
from gorilla_jax.config import Config, dump_config
from gorilla_jax.errors import GorillaError
from gorilla_jax.model.layers import dtype_of
from gorilla_jax.train import metrics as metrics_lib
from gorilla_jax.train.checkpoints import RunCheckpointer, abstract_like
from gorilla_jax.train.optimizer import make_in_place_update, make_optimizer, make_schedule
from gorilla_jax.train.step import (BATCH_KEYS, LOGITS_AXES, TrainState, make_eval_step,
                                    make_train_step)
from gorilla_jax.train.workspace import JittedTrainStep, logits_workspace, uses_logits_workspace

log = logging.getLogger(__name__)


class TrainingDiverged(GorillaError):
    """The loss became NaN or infinite."""


class DataSource(Protocol):
    """What the loop needs from a data pipeline (see data_pipeline.pipeline)."""

    def __next__(self) -> dict:  # host-local numpy arrays [host_batch, seq_len]
        ...

    def position(self) -> dict:  # JSON-serialisable; restores the stream exactly
        ...


@dataclass
class TrainResult:
    run_dir: str
    start_step: int
    final_step: int
    status: str  # completed | preempted (SIGTERM) | stopped (stop_at)
    losses: list = field(default_factory=list)  # (step, loss) of every step run here
    eval_losses: list = field(default_factory=list)  # (step, loss)
    last_checkpoint: Optional[int] = None
    state: Any = None  # the final TrainState (on the mesh)


class _Preemption:
    """Turns SIGTERM into a flag the loop checks at step boundaries (all hosts agree)."""

    def __init__(self):
        self.flag = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self.flag = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return self.flag or multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------- state


def state_shardings(cfg: Config, mesh, optimizer, abstract_params) -> TrainState:
    param_sh = sharding.param_shardings(cfg.model, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_sh = optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt, param_sh,
        transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def _host_to_global(tree, shardings):
    """Host numpy arrays (the whole value on every host) -> global arrays with ``shardings``."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx, x=x: np.asarray(x[idx])),
        tree, shardings)


def initial_params(cfg: Config, param_sh, rng):
    """Random parameters, or the weights of ``train.init_from`` (HF directory or checkpoint)."""
    from gorilla_jax.model import init_params

    if cfg.train.init_from is None:
        return jax.jit(lambda r: init_params(cfg.model, r), out_shardings=param_sh)(rng)
    from gorilla_jax.loading import load_model

    loaded_cfg, params = load_model(cfg.train.init_from, dtype=cfg.model.param_dtype,
                                    scan_layers=cfg.model.scan_layers)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings"):
        want, got = getattr(cfg.model, key), getattr(loaded_cfg, key)
        if want != got:
            raise GorillaError(f"train.init_from={cfg.train.init_from}: its model.{key} is {got} "
                               f"but the config says {want}")
    return _host_to_global(params, param_sh)


# ----------------------------------------------------------------------------- loop


def global_batch(batch: dict, batch_sh: NamedSharding, global_batch_size: int) -> dict:
    out = {}
    for key in BATCH_KEYS:
        local = np.asarray(batch[key])
        shape = (global_batch_size,) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(batch_sh, local, shape)
    return out


def train(cfg: Config, data_factory: Callable[[Config, Optional[dict]], DataSource], *,
          eval_batches: Optional[Callable[[], list]] = None,
          progress: bool = True, stop_at: Optional[int] = None) -> TrainResult:
    """Train per ``cfg``. ``data_factory(cfg, position)`` builds the (resumed) data source.

    ``stop_at``: stop after this step (with a checkpoint) as an interrupted run would; the
    schedule still runs to ``train.steps``, so a later call resumes the same run.
    """
    from gorilla_jax.model import LlamaForCausalLM, abstract_params

    t = cfg.train
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(cfg.mesh)
    model = LlamaForCausalLM(cfg.model)
    abstract = abstract_params(cfg.model)
    optimizer = make_optimizer(cfg.optimizer, t.steps, abstract)
    schedule = make_schedule(cfg.optimizer, t.steps)
    state_sh = state_shardings(cfg, mesh, optimizer, abstract)
    batch_sh = sharding.batch_sharding(mesh, 2, shape=(t.global_batch_size, cfg.data.seq_len))
    replicated = NamedSharding(mesh, PartitionSpec())

    ckpt = RunCheckpointer(t.run_dir, keep=t.keep_checkpoints, async_save=t.async_checkpoint)
    resolved = cfg.to_dict()
    start = ckpt.latest_step()
    if start is not None:
        abstract_state = jax.eval_shape(
            lambda: TrainState(step=jnp.int32(0), params=abstract, opt_state=optimizer.init(abstract),
                               rng=jax.random.PRNGKey(0)))
        state, position, _ = ckpt.restore(start, abstract_like(abstract_state, state_sh))
        log.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        start, position = 0, None
        rng = jax.random.PRNGKey(t.seed)
        init_rng, state_rng = jax.random.split(rng)
        with sharding.activate(mesh):
            params = initial_params(cfg, state_sh.params, init_rng)
            opt_state = jax.jit(optimizer.init, out_shardings=state_sh.opt_state)(params)
        state = TrainState(step=jax.device_put(jnp.int32(0), replicated), params=params,
                           opt_state=opt_state, rng=jax.device_put(state_rng, replicated))
    data = data_factory(cfg, position)

    step_fn = make_train_step(model.apply, optimizer, micro_batches=t.micro_batches,
                              z_loss=cfg.optimizer.z_loss, schedule=schedule,
                              in_place_update=make_in_place_update(cfg.optimizer, t.steps,
                                                                   abstract))
    workspace = None  # on CPU, the step's large arrays kept mapped (train/workspace.py)
    with sharding.activate(mesh):
        if uses_logits_workspace(t.micro_batches, dtype=cfg.model.dtype):
            ws_shape = (t.global_batch_size * cfg.data.seq_len, cfg.model.vocab_size)
            ws_sh = NamedSharding(mesh, sharding.logical_to_spec(LOGITS_AXES, mesh, shape=ws_shape))
            workspace = logits_workspace(t.global_batch_size, cfg.data.seq_len,
                                         cfg.model.vocab_size, dtype_of(cfg.model.dtype), ws_sh)
        jit_step = JittedTrainStep(step_fn, workspace, state_sh, batch_sh, replicated)
        jit_eval = jax.jit(make_eval_step(model.apply), in_shardings=(state_sh.params, batch_sh),
                           out_shardings=replicated)

    writer = metrics_lib.MetricWriter(t.run_dir, enabled=is_main, tensorboard=t.tensorboard)
    if is_main:
        import tensorflow as tf

        tf.io.gfile.makedirs(t.run_dir)
        with tf.io.gfile.GFile(t.run_dir.rstrip("/") + "/config.yaml", "w") as f:
            f.write(dump_config(cfg))
    flops = metrics_lib.flops_per_step(cfg.model, t.global_batch_size, cfg.data.seq_len)
    peak = metrics_lib.device_peak_flops()
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    result = TrainResult(run_dir=t.run_dir, start_step=start, final_step=start, status="completed",
                         last_checkpoint=ckpt.latest_step())
    bar = None
    if progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    profiling = False
    step = start
    clock = time.perf_counter()  # when the last step's metrics arrived

    def record(done_step: int, m) -> None:
        """Fetch one step's metrics (blocks until that step is done), check and log them."""
        nonlocal clock
        m = jax.device_get(m)
        now = time.perf_counter()
        dt, clock = now - clock, now
        loss = float(m["loss"])
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss} at step {done_step}; stopping. The last good checkpoint is "
                f"step {ckpt.latest_step()} in {ckpt.directory}")
        result.losses.append((done_step, loss))
        if done_step % t.log_every == 0 or done_step == t.steps:
            row = {"loss": loss, "grad_norm": float(m["grad_norm"]),
                   "learning_rate": float(m["learning_rate"]),
                   "tokens_per_sec": tokens_per_step / dt,
                   "tflops_per_device": flops / dt / jax.device_count() / 1e12}
            if peak:
                row["mfu"] = flops / dt / jax.device_count() / peak
            writer.write(done_step, row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}")

    read_late = t.async_metrics if t.async_metrics is not None else jax.default_backend() != "cpu"
    pending = None  # (step, metrics still on the device) of the step dispatched last
    try:
        with _Preemption() as preempt, sharding.activate(mesh):
            while step < t.steps:
                if t.profile_steps and step == t.profile_steps[0] and is_main:
                    jax.profiler.start_trace(t.run_dir.rstrip("/") + "/profile")
                    profiling = True
                batch = global_batch(next(data), batch_sh, t.global_batch_size)
                state, m = jit_step(state, batch)  # dispatched; runs while the host goes on
                step += 1
                # The previous step's metrics are read only now, so the host's next batch and
                # dispatch overlap the device's work instead of waiting for it.
                if pending is not None:
                    record(*pending)
                pending = (step, m)
                preempted = preempt.reached(step) or (stop_at is not None and step >= stop_at)
                evaluating = bool(t.eval_every and eval_batches is not None
                                  and step % t.eval_every == 0)
                saving = step % t.checkpoint_every == 0 or step == t.steps or preempted
                stop_profile = profiling and step > t.profile_steps[1]
                if read_late and not (evaluating or saving or stop_profile):
                    continue
                record(*pending)  # a finite loss before anything is saved or evaluated
                pending = None
                if stop_profile:
                    jax.profiler.stop_trace()
                    profiling = False
                if evaluating:
                    ev = evaluate_loss(jit_eval, state.params, eval_batches(), batch_sh,
                                       t.global_batch_size)
                    result.eval_losses.append((step, ev))
                    writer.write(step, {"eval_loss": ev})
                if saving:
                    ckpt.save(step, state, data.position(), resolved, force=True)
                    result.last_checkpoint = step
                clock = time.perf_counter()  # eval and saving are not the next step's time
                if preempted:
                    result.status = "stopped" if preempt.flag is False and stop_at else "preempted"
                    log.warning("%s: checkpoint saved at step %d", result.status, step)
                    break
    finally:
        if profiling:
            jax.profiler.stop_trace()
        if bar is not None:
            bar.close()
        ckpt.close()
        writer.close()
    result.final_step = step
    result.state = state
    return result


def evaluate_loss(jit_eval, params, batches: list, batch_sh, global_batch_size: int) -> float:
    """Mean token cross-entropy of ``params`` over held-out host-local batches."""
    total, tokens = 0.0, 0.0
    for b in batches:
        out = jax.device_get(jit_eval(params, global_batch(b, batch_sh, global_batch_size)))
        total += float(out["loss_sum"])
        tokens += float(out["tokens"])
    return total / max(tokens, 1.0)
