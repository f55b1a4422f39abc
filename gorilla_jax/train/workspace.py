"""The jitted train step, and on CPU the donated workspace that keeps its large arrays mapped.

XLA:CPU allocates a program's temporaries with ``malloc``, as one block per execution, and frees
the block afterwards. glibc's malloc serves a request from memory it keeps (its arenas) only
below its mmap threshold, which rises to the largest block freed so far but at most 32 MiB on
64-bit systems. A larger block is a fresh ``mmap`` on every step, and the kernel faults in and
zeroes each of its pages again (19M benchmark model, 103 MiB of temporaries: ~420 page faults
and ~15 ms of system time per step with huge pages, ~28,000 and ~65 ms without). In a virtual
machine whose balloon device reports free pages to the host, memory that stayed free for a
couple of seconds goes back to the host, and the first step after a pause pays a host fault on
every page as well (100-250 ms of system time; in ``bench compare`` that is every round).

What stays mapped is what the step returns into donated buffers: the jitted step takes a
*workspace* and returns it, and XLA computes the returned values in the workspace's buffers.

- The logits, [B*S, V], the step's largest array (:func:`logits_workspace`): the train step
  takes it as an array and returns the logits' gradient in it (``step.head_loss_sums``).
- With the workspace on one device, also the *residuals* (the arrays the backward pass reads:
  the layers' activations and the head's gradients, which the fused head computes in the
  forward) and the embedding table's gradient ([V, D], zero-filled and scattered into after
  the backward). :class:`JittedTrainStep` finds their shapes by tracing the step once
  (``jax.eval_shape``) and then hands the step a dict ``{"logits", "residuals",
  "embed_grad"}``.

What is left among the temporaries are the backward pass's working arrays (19M benchmark model:
26 MiB), below the threshold, so from the second step on malloc hands the same memory back and
no step faults pages in (docs/PERFORMANCE.md). The residuals stay allocated between steps: the
workspace holds about the activations' memory for the whole run. Accelerators' allocators keep
their memory pools, so none of this is used there.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Residuals smaller than this stay temporaries: together they barely change the block's size,
# and each array the step returns costs some dispatch time.
RESIDUAL_MIN_BYTES = 256 << 10


def uses_logits_workspace(micro_batches: int = 1, backend: str | None = None,
                          dtype: str = "float32") -> bool:
    """Whether the train loop hands the step a workspace: on the CPU backend, with float32
    compute (``model.dtype``), without gradient accumulation.

    With a 16-bit compute dtype the logits workspace would hold the 16-bit gradient while the
    float32 logits stayed a temporary (the gradient is not written over them), so it would save
    nothing; gradient accumulation runs the forward and backward inside a ``lax.scan``, whose
    arrays cannot be returned.
    """
    return ((backend or jax.default_backend()) == "cpu" and micro_batches == 1
            and str(dtype) == "float32")


def logits_workspace(batch_size: int, seq_len: int, vocab_size: int, dtype, sharding=None):
    """Zeros [batch_size * seq_len, vocab_size] in the compute ``dtype`` (with ``sharding``,
    created sharded): the ``workspace`` argument of the train step."""
    shape = (batch_size * seq_len, vocab_size)
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def keeps_residuals(workspace) -> bool:
    """Whether :class:`JittedTrainStep` extends a logits workspace by the residuals: when it
    lives on one device. (Sharded over several, the residuals' shardings would be XLA's choice,
    and a donated buffer is only reused for an output with the same sharding.)"""
    return workspace is not None and len(workspace.sharding.device_set) == 1


def residual_arrays(vjp_fn, exclude) -> tuple:
    """The arrays that ``vjp_fn`` (from ``jax.vjp`` under tracing) holds for the backward pass
    and that the traced step computed: tracers of at least :data:`RESIDUAL_MIN_BYTES`, none of
    the arrays in ``exclude`` (the step's inputs: parameters, batch, workspace), each once."""
    seen = {id(x) for x in jax.tree.leaves(exclude)}
    out = []
    for x in jax.tree.leaves(vjp_fn):
        if (isinstance(x, jax.core.Tracer) and id(x) not in seen
                and x.size * x.dtype.itemsize >= RESIDUAL_MIN_BYTES):
            seen.add(id(x))
            out.append(x)
    return tuple(out)


class JittedTrainStep:
    """A train step under ``jax.jit`` with the state donated: ``step(state, batch) ->
    (state, metrics)``.

    With ``workspace`` (:func:`logits_workspace`) the step takes and returns it as well,
    donated and jitted with ``keep_unused=True`` (the step writes the workspace without reading
    it; jit would otherwise drop the argument, and the returned workspace would be a new
    buffer every step); the workspace is kept here and fed back on every call. Where
    :func:`keeps_residuals`, the first call (or :meth:`lower`) traces the step once to find the
    residuals' shapes and extends the workspace to ``{"logits", "residuals", "embed_grad"}``
    (see the module docstring); ``keep_residuals=False`` keeps the logits workspace alone.
    With ``state_sharding``, ``batch_sharding`` and ``metrics_sharding``, those are the jit's
    in and out shardings (the workspace keeps its own).
    """

    def __init__(self, step_fn: Callable, workspace=None, state_sharding=None,
                 batch_sharding=None, metrics_sharding=None, keep_residuals: bool = True):
        self._fn = step_fn
        self._shardings = (state_sharding, batch_sharding, metrics_sharding)
        self.workspace = workspace
        extend = keep_residuals and keeps_residuals(workspace)
        self._jit = None if extend else self._make_jit()

    def _make_jit(self):
        state_sh, batch_sh, metrics_sh = self._shardings
        kw: dict = {}
        if state_sh is not None:
            ins, outs = (state_sh, batch_sh), (state_sh, metrics_sh)
            if self.workspace is not None:
                ws_sh = jax.tree.map(lambda x: x.sharding, self.workspace)
                ins, outs = ins + (ws_sh,), outs + (ws_sh,)
            kw = {"in_shardings": ins, "out_shardings": outs}
        if self.workspace is None:
            return jax.jit(self._fn, donate_argnums=(0,), **kw)
        return jax.jit(self._fn, donate_argnums=(0, 2), keep_unused=True, **kw)

    def _ready(self, state, batch):
        """The jitted step, after extending the workspace by the residuals on the first call."""
        if self._jit is None:
            logits = self.workspace
            shapes = jax.eval_shape(self._fn, state, batch, {"logits": logits})[2]
            sharding = jax.sharding.SingleDeviceSharding(next(iter(logits.sharding.device_set)))
            zeros = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                 (shapes["residuals"], shapes["embed_grad"])),
                            out_shardings=sharding)()
            self.workspace = {"logits": logits, "residuals": zeros[0], "embed_grad": zeros[1]}
            self._jit = self._make_jit()
        return self._jit

    def _args(self, state, batch) -> tuple:
        return (state, batch) if self.workspace is None else (state, batch, self.workspace)

    def __call__(self, state, batch):
        step = self._ready(state, batch)
        if self.workspace is None:
            return step(state, batch)
        state, metrics, self.workspace = step(state, batch, self.workspace)
        return state, metrics

    def lower(self, state, batch):
        return self._ready(state, batch).lower(*self._args(state, batch))
