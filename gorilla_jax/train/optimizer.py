"""optax from config: AdamW, warm-up then cosine/linear/constant, clipping, weight-decay mask."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from gorilla_jax import cpu_kernels
from gorilla_jax.config import OptimizerConfig


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak rate, then decay to ``peak * end_learning_rate_ratio``."""
    peak = cfg.learning_rate
    end = peak * cfg.end_learning_rate_ratio
    warmup = min(cfg.warmup_steps, max(total_steps, 1))
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def param_path(path) -> str:
    """'layers_0/self_attn/q_proj/kernel' for a jax tree path."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(name))
    return "/".join(parts)


def weight_decay_mask(params, exclude_patterns: list[str]):
    """True where weight decay applies: every parameter whose path matches no exclude regex."""
    regexes = [re.compile(p) for p in exclude_patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(r.search(param_path(path)) for r in regexes), params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, params) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule and the decay mask of ``params``.

    ``update`` takes an optional ``grad_norm=`` (see :func:`clip_by_global_norm`).

    ``params`` may be abstract (``jax.ShapeDtypeStruct`` leaves): only its structure is read.
    """
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay,
                             mask=weight_decay_mask(params, cfg.weight_decay_exclude)))
    return optax.chain(*parts)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Scale the updates to a global norm of at most ``max_norm``, like optax's transform of
    that name, except that the caller may pass the norm (``update(..., grad_norm=n)``).

    The train step passes the norm it computes from the gradient sums before they are divided
    by the token count. When the norm was taken over the divided gradients (as optax's
    transform does), XLA:CPU wrote them out as a separate array, read by both the norm and the
    AdamW update: on the 19M benchmark model clipping + AdamW took 27-36 ms, against 18-20 ms
    with the norm passed in (docs/PERFORMANCE.md).
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.global_norm(updates) if grad_norm is None else grad_norm
        factor = clip_factor(norm, max_norm)
        return jax.tree.map(lambda u: u * factor.astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_factor(norm, max_norm: float):
    """The factor that scales gradients of global norm ``norm`` to at most ``max_norm``."""
    return jnp.where(norm < max_norm, 1.0, max_norm / norm)


def make_in_place_update(cfg: OptimizerConfig, total_steps: int, params):
    """The update of :func:`make_optimizer`'s chain (same configuration, same state) done in
    place by the native CPU kernel, one pass per parameter: ``update(params, grad_sums,
    grad_scale, grad_norm, opt_state) -> (params, opt_state)``, where the gradients are
    ``grad_sums * grad_scale`` and ``grad_norm`` is their global norm.

    ``update`` returns None when the kernel does not apply (decided when the step is traced:
    not on one CPU device, parameters not float32, a state that is not this chain's, see
    :func:`gorilla_jax.cpu_kernels.usable`);
    the caller then runs the optax chain. XLA:CPU makes three loops of each parameter's update
    (no multi-output fusion) and reads the moments twice; the kernel reads parameter, gradient
    and moments once (19M benchmark model: clipping + AdamW 17 -> 12 ms alone;
    docs/PERFORMANCE.md).
    """
    schedule = make_schedule(cfg, total_steps)
    decays = jax.tree.leaves(weight_decay_mask(params, cfg.weight_decay_exclude))
    clip = cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else None

    def update(params, grad_sums, grad_scale, grad_norm, opt_state):
        leaves, treedef = jax.tree.flatten(params)
        if (any(x.dtype != jnp.float32 for x in leaves + jax.tree.leaves(grad_sums))
                or not cpu_kernels.usable()):
            return None
        adam = _find_state(opt_state, optax.ScaleByAdamState)
        sched = _find_state(opt_state, optax.ScaleByScheduleState)
        if adam is None or sched is None:  # not make_optimizer's chain
            return None
        count = optax.safe_increment(adam.count)
        factor = 1.0 if clip is None else clip_factor(grad_norm, clip)
        # as optax computes them: 1 - b from Python floats, b ** count for the bias corrections
        scalars = jnp.stack([jnp.asarray(x, jnp.float32) for x in (
            grad_scale, factor, cfg.b1, 1 - cfg.b1, cfg.b2, 1 - cfg.b2, cfg.eps,
            schedule(sched.count), 1 - cfg.b1 ** count, 1 - cfg.b2 ** count)])
        out = [cpu_kernels.adamw_in_place(p, g, m, v, scalars,
                                          cfg.weight_decay if decay else 0.0)
               for p, g, m, v, decay in zip(leaves, treedef.flatten_up_to(grad_sums),
                                            treedef.flatten_up_to(adam.mu),
                                            treedef.flatten_up_to(adam.nu), decays)]
        new_params, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
        states = {optax.ScaleByAdamState: adam._replace(count=count, mu=mu, nu=nu),
                  optax.ScaleByScheduleState: sched._replace(
                      count=optax.safe_increment(sched.count))}
        return new_params, _replace_states(opt_state, states)

    return update


def _find_state(state, kind):
    if isinstance(state, kind):
        return state
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        for s in state:
            found = _find_state(s, kind)
            if found is not None:
                return found
    return None


def _replace_states(state, new: dict):
    if type(state) in new:
        return new[type(state)]
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return tuple(_replace_states(s, new) for s in state)
    return state
