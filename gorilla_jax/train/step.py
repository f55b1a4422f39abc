"""The loss and the train/eval steps: pure functions, jit-compiled by the loop.

A batch is a dict of [batch, length] arrays from the data pipeline: ``input_ids``, ``targets``
(next-token labels), ``loss_mask`` (1 on response tokens only), ``segment_ids`` (packed
examples; 0 is padding) and ``positions`` (restarting at 0 in every segment).

The loss is the mean token cross-entropy over the masked tokens of the whole global batch. The
model returns its final hidden states and :func:`head_loss_sums` applies the LM head and the
cross-entropy as one custom-VJP function: its forward pass also computes the gradient of the
logits (softmax - one-hot, with one exponential per logit, written over the logits) and the two
head-gradient products, so autodiff never materialises the logits' backward graph (measured on
the 19M benchmark model on CPU: 25% less step time, 30% with the gathered target logit;
docs/PERFORMANCE.md). With
gradient accumulation (``micro_batches`` > 1) the batch is split along its first axis, the
micro-batches' summed losses and gradients are accumulated in a ``lax.scan``, and the sums are
divided by the total token count once, so 4 micro-batches of 2 give the same update as one
batch of 8. On CPU the loop also passes a workspace through the step, which keeps the
step's large arrays in memory that stays mapped across steps (train/workspace.py).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from gorilla_jax.model.layers import materialised_transpose, unsplit
from gorilla_jax.sharding import with_logical_constraint
from gorilla_jax.train.workspace import residual_arrays

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def token_loss_sums(logits, targets, loss_mask, z_loss: float = 0.0):
    """(sum of masked cross-entropy, sum of masked z-loss, number of masked tokens)."""
    logits = logits.astype(jnp.float32)
    mask = loss_mask.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ce = (lse - target_logit) * mask
    zl = z_loss * jnp.square(lse) * mask if z_loss else jnp.zeros_like(ce)
    return ce.sum(), zl.sum(), mask.sum()


# The head works on one row per token, [B*S, ...]. With [B*S, V] logits (no [B, S, V] views of
# them) XLA:CPU writes the logits' gradient (or, for a vocabulary on one device, the
# exponentials it is made of) over the logits in place; it did not for the [B, S, V] form (19M
# benchmark step: 410 -> 318 MB of temporaries; docs/PERFORMANCE.md). The token axis keeps the
# batch's sharding ("length" is never split).
LOGITS_AXES = ("batch", "vocab")


def _head_forward(hidden, head, targets, loss_mask, z_loss, vocab_major, with_grads):
    """Sums (ce, z-loss) and, with ``with_grads``, the gradients of ce + z-loss w.r.t. hidden,
    head and the [B*S, V] array the two gradient products read (see :func:`_exp_once_grads`)."""
    B, S, D = hidden.shape
    rows = hidden.reshape(B * S, D)
    targets = targets.reshape(B * S).astype(jnp.int32)
    mask = loss_mask.reshape(B * S).astype(jnp.float32)
    spec = "td,vd->tv" if vocab_major else "td,dv->tv"
    logits = jnp.einsum(spec, rows, head, preferred_element_type=jnp.float32)
    logits = with_logical_constraint(logits, LOGITS_AXES)
    whole_vocab = unsplit(("vocab",))
    if whole_vocab:
        # each row's target logit from the target's head vector (a gather of B*S vectors of
        # D), not from the logits: the exponentials can then overwrite the logits in place
        # without waiting for a read of them (XLA:CPU gave up the in-place write, and kept two
        # [B*S, V] buffers, when the exponentials depended on a gather from the logits)
        head_t = jnp.take(head, targets, axis=0 if vocab_major else 1)
        head_t = head_t if vocab_major else head_t.T  # [B*S, D]
        target_logit = jnp.sum(rows.astype(jnp.float32) * head_t.astype(jnp.float32), axis=-1)
    else:  # vocabulary split over devices: a masked sum reduces shard-locally, then all-reduces
        target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]
        target_logit = jnp.sum(jnp.where(target, logits, 0.0), axis=-1)
    if with_grads and whole_vocab:
        lse, dlogits, row_scale = _exp_once_grads(logits, targets, mask, z_loss, target_logit)
    else:
        lse = jax.nn.logsumexp(logits, axis=-1)
    ce = jnp.sum((lse - target_logit) * mask)
    zl = jnp.sum(z_loss * jnp.square(lse) * mask) if z_loss else jnp.zeros((), jnp.float32)
    if not with_grads:
        return ce, zl, None, None
    if not whole_vocab:
        # d(ce + zl)/dlogits = mask * (softmax * (1 + 2 z lse) - onehot), one pass over [B*S, V]
        probs = jnp.exp(logits - lse[:, None])
        if z_loss:
            probs = probs * (1.0 + 2.0 * z_loss * lse[:, None])
        dlogits = (probs - target.astype(jnp.float32)) * mask[:, None]
        row_scale = None
    dlogits = with_logical_constraint(dlogits.astype(hidden.dtype), LOGITS_AXES)
    scaled_rows = rows if row_scale is None else (rows * row_scale[:, None]).astype(rows.dtype)
    # d_head as [D, V] = rows^T dlogits, with the rows' transpose materialised: the fast
    # (YNNPACK) product on CPU. A tied [V, D] head takes that product's transpose (32 MB for
    # the 19M model) behind a barrier, so XLA does not fold it back into the product, which it
    # ran over a transposed copy of dlogits ([B*S, V], 131 MB; tied head + loss temporaries
    # 375 -> 156 MB).
    rows_t = materialised_transpose(scaled_rows)
    d_head = jnp.einsum("dt,tv->dv", rows_t, dlogits, preferred_element_type=jnp.float32)
    if vocab_major:
        d_rows = jnp.einsum("tv,vd->td", dlogits, head, preferred_element_type=jnp.float32)
        d_head = jax.lax.optimization_barrier(d_head).T
    else:
        d_rows = jnp.einsum("tv,dv->td", dlogits, head, preferred_element_type=jnp.float32)
    if row_scale is not None:
        d_rows = d_rows * row_scale[:, None]
    grads = (d_rows.reshape(B, S, D).astype(hidden.dtype), d_head.astype(head.dtype))
    return ce, zl, grads, dlogits


def _exp_once_grads(logits, targets, mask, z_loss, target_logit):
    """(lse [T], u [T, V], c [T]) with ``c[:, None] * u`` the gradient of ce + z-loss w.r.t. the
    logits, ``mask * (softmax * (1 + 2 z lse) - onehot)``, for a vocabulary on one device.

    ``u = exp(logits - max)`` with ``s / (1 + 2 z lse)`` taken off each row's target entry
    (``s`` the row's sum of ``exp``), ``c = mask * (1 + 2 z lse) / s``: the exponentials are
    computed once, into the logits' buffer (a scatter of one value per row then corrects the
    targets in place), and the per-row scale ``c`` is applied to the head-gradient products'
    [T, D] operand and result instead of in a pass over [T, V]. The gradient written out as
    one expression took a second ``exp`` pass that also read and wrote all of [T, V] (19M
    benchmark model on CPU: the head's passes 71 -> 36 ms; docs/PERFORMANCE.md).

    ``target_logit`` [T] becomes a data dependency of ``u`` (0 * target_logit is added to the
    scatter's values): the caller's gather of the head's target vectors then runs
    before the head's update in the train step, which writes over the donated head in place.
    Without it the gather was ordered only before the loss, and XLA copied the head (33 MB
    for the 19M benchmark model) at the start of every step to keep it readable.
    """
    row_max = jnp.max(logits, axis=-1)
    e = jnp.exp(logits - row_max[:, None])
    s = jnp.sum(e, axis=-1)
    lse = row_max + jnp.log(s)
    zf = 1.0 + 2.0 * z_loss * lse if z_loss else jnp.ones_like(lse)
    zf = jnp.where(zf == 0.0, jnp.float32(1e-30), zf)  # lse == -1 / (2 z): the gradient is -onehot
    rows = jnp.arange(logits.shape[0], dtype=jnp.int32)
    u = e.at[rows, targets].add(-s / zf + 0.0 * target_logit, indices_are_sorted=True,
                                unique_indices=True)
    return lse, u, mask * zf / s


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def head_loss_sums(hidden, head, targets, loss_mask, z_loss: float = 0.0,
                   vocab_major: bool = False, workspace=None):
    """The LM head and masked cross-entropy fused: ``(objective, (ce_sum, z_loss_sum))``.

    ``hidden`` [B, S, D] final-normed states in the compute dtype; ``head`` the head kernel in
    the same dtype, [D, V] (``lm_head/kernel``) or, with ``vocab_major``, [V, D] (a tied
    embedding). ``objective = ce_sum + z_loss_sum`` is the differentiable output; the two sums
    returned beside it are for reporting and carry no gradient (their cotangents are ignored).
    The logits' softmax, logsumexp and the z-loss run in float32. Under differentiation the
    forward pass computes the gradients too and keeps only d_hidden and d_head (no [B, S, V]
    residual).

    ``workspace``: None, or a [B*S, V] array in hidden's dtype
    (``workspace.logits_workspace``); it is then returned as a third reporting output, holding
    the array the head-gradient products read under differentiation (the logits' gradient up
    to a per-row scale, see :func:`_exp_once_grads`; unchanged without). Donated to the jitted
    step and fed back each step, it gives XLA a buffer for the logits that stays mapped across
    steps (see train/workspace.py).
    """
    _check_workspace(workspace, hidden, head, vocab_major)
    ce, zl, _, _ = _head_forward(hidden, head, targets, loss_mask, z_loss, vocab_major, False)
    return ce + zl, (ce, zl) if workspace is None else (ce, zl, workspace)


def _head_loss_fwd(hidden, head, targets, loss_mask, z_loss, vocab_major, workspace=None):
    _check_workspace(workspace, hidden, head, vocab_major)
    ce, zl, grads, dlogits = _head_forward(hidden, head, targets, loss_mask, z_loss, vocab_major,
                                           True)
    return (ce + zl, (ce, zl) if workspace is None else (ce, zl, dlogits)), grads


def _head_loss_bwd(z_loss, vocab_major, grads, cotangents):
    g = cotangents[0]
    d_hidden, d_head = grads
    return d_hidden * g.astype(d_hidden.dtype), d_head * g.astype(d_head.dtype), None, None, None


head_loss_sums.defvjp(_head_loss_fwd, _head_loss_bwd)


def _check_workspace(workspace, hidden, head, vocab_major):
    if workspace is None:
        return
    B, S, _ = hidden.shape
    want = (B * S, head.shape[0] if vocab_major else head.shape[1])
    if tuple(workspace.shape) != want or workspace.dtype != hidden.dtype:
        raise ValueError(f"logits workspace is {workspace.dtype}{list(workspace.shape)}; this "
                         f"batch needs {hidden.dtype}{list(want)} ([batch * seq_len, vocab_size] "
                         "in the compute dtype, see logits_workspace)")


def lm_head(params, dtype):
    """(head kernel in ``dtype``, vocab_major): ``lm_head/kernel`` [D,V], or the tied embedding [V,D]."""
    if "lm_head" in params:
        return params["lm_head"]["kernel"].astype(dtype), False
    return params["embed_tokens"]["embedding"].astype(dtype), True


def _forward_sums(apply_fn, params, batch, z_loss, workspace=None):
    """(differentiable objective = ce + z-loss sums, ce sum, number of loss tokens, the
    logits workspace after the step or None)."""
    hidden = apply_fn({"params": params}, batch["input_ids"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], return_hidden=True)
    head, vocab_major = lm_head(params, hidden.dtype)
    objective, (ce, _, *ws) = head_loss_sums(hidden, head, batch["targets"], batch["loss_mask"],
                                             float(z_loss), vocab_major, workspace)
    return objective, ce, batch["loss_mask"].astype(jnp.float32).sum(), (ws[0] if ws else None)


def make_train_step(apply_fn: Callable, optimizer: optax.GradientTransformation, *,
                    micro_batches: int = 1, z_loss: float = 0.0,
                    schedule: optax.Schedule | None = None,
                    in_place_update: Callable | None = None):
    """Return ``train_step(state, batch) -> (state, metrics)`` (not yet jit-compiled).

    The optimizer's ``update`` gets the gradients' global norm as ``grad_norm=`` (used by
    :func:`gorilla_jax.train.optimizer.clip_by_global_norm`; other transforms ignore it).
    ``in_place_update``: :func:`gorilla_jax.train.optimizer.make_in_place_update` for the same
    optimizer; where it applies (one CPU device) it replaces ``update`` + ``apply_updates``.
    ``train_step(state, batch, workspace) -> (state, metrics, workspace)`` with a workspace
    (``micro_batches`` = 1 only; train/workspace.py): a logits workspace
    (``workspace.logits_workspace``), returned holding the logits' gradient; or a dict with it
    under ``"logits"``, returned as ``{"logits", "residuals", "embed_grad"}``: the same, the
    arrays the backward pass read (``workspace.residual_arrays``) and the embedding table's
    gradient. ``workspace.JittedTrainStep`` jits every form and feeds the workspace back.
    """
    optimizer = optax.with_extra_args_support(optimizer)

    def sums_and_grads(params, batch, workspace=None):
        keep = isinstance(workspace, dict)
        logits_ws = workspace["logits"] if keep else workspace

        def objective(p):
            obj, ce, n, ws = _forward_sums(apply_fn, p, batch, z_loss, logits_ws)
            return obj, (ce, n, ws)

        if not keep:
            (_, (ce, n, ws)), grads = jax.value_and_grad(objective, has_aux=True)(params)
            return ce, n, grads, ws
        # jax.vjp + a unit cotangent is what value_and_grad does; here the residuals the
        # backward reads are at hand, to be returned into the workspace
        obj, vjp_fn, (ce, n, ws) = jax.vjp(objective, params, has_aux=True)
        residuals = residual_arrays(vjp_fn, (params, batch, workspace, ws))
        (grads,) = vjp_fn(jnp.ones_like(obj))
        # Of the gradients only the embedding table's is large and computed here: the head's
        # is one of the residuals (the fused head computes it in the forward; returned twice,
        # XLA would copy it), and the layers' are small.
        return ce, n, grads, {"logits": ws, "residuals": residuals,
                              "embed_grad": grads["embed_tokens"]["embedding"]}

    def train_step(state: TrainState, batch, workspace=None):
        if workspace is not None and micro_batches != 1:
            raise ValueError("a step workspace needs train.micro_batches = 1, "
                             f"not {micro_batches}")
        if micro_batches == 1:
            ce, n, grads, workspace = sums_and_grads(state.params, batch, workspace)
        else:
            split = jax.tree.map(
                lambda x: x.reshape((micro_batches, x.shape[0] // micro_batches) + x.shape[1:]), batch)

            def body(carry, micro):
                ce_acc, n_acc, g_acc = carry
                ce, n, g, _ = sums_and_grads(state.params, micro)
                return (ce_acc + ce, n_acc + n, jax.tree.map(jnp.add, g_acc, g)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (ce, n, grads), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros), split)
        denom = jnp.maximum(n, 1.0)
        # The norm of the sums, not of the scaled gradients, and a multiplication, not a
        # division: then XLA computes the scaled gradients inside the AdamW update instead of
        # writing them out first (see optimizer.clip_by_global_norm).
        grad_norm = optax.global_norm(grads) / denom
        inv_denom = 1.0 / denom
        updated = (None if in_place_update is None else
                   in_place_update(state.params, grads, inv_denom, grad_norm, state.opt_state))
        if updated is not None:
            params, opt_state = updated
        else:
            grads = jax.tree.map(lambda g, p: (g * inv_denom).astype(p.dtype), grads,
                                 state.params)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params,
                                                  grad_norm=grad_norm)
            params = optax.apply_updates(state.params, updates)
        metrics = {"loss": ce / denom, "grad_norm": grad_norm, "tokens": n}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=jax.random.fold_in(state.rng, state.step))
        if workspace is not None:
            return new_state, metrics, workspace
        return new_state, metrics

    return train_step


def make_eval_step(apply_fn: Callable):
    """Return ``eval_step(params, batch) -> {'loss_sum', 'tokens'}`` for held-out loss."""

    def eval_step(params, batch):
        _, ce, n, _ = _forward_sums(apply_fn, params, batch, 0.0)
        return {"loss_sum": ce, "tokens": n}

    return eval_step
