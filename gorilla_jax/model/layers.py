"""Building blocks of the LLaMA decoder: parameters with logical axes, RMSNorm, RoPE, SwiGLU MLP.

Every parameter is created through :func:`param` so it carries logical axis names
(``nn.LogicallyPartitioned`` at init; plain arrays are accepted at apply time).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gorilla_jax.config import ModelConfig
from gorilla_jax.sharding import active_mesh, logical_to_spec, with_logical_constraint

# Compute projections that read the same input (q/k/v; gate/up) as one matrix product over
# kernels concatenated at trace time when there are at most FUSE_MAX_ROWS token rows (batch *
# length: decoding). The parameters stay separate (HF names, logical axes). Measured on CPU:
# decode at batch 16 +11% tokens/s; on the 19M training step (1024 rows) neutral to 3% slower
# (the concatenation and the slices of the gradient cost about what fewer products save).
FUSE_PROJECTIONS = True
FUSE_MAX_ROWS = 64


def dtype_of(name: str):
    return jnp.dtype(name)


def param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str], init):
    """A parameter of ``module`` with logical axis names ``axes``, in the config's param dtype."""
    cfg: ModelConfig = module.config
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                        dtype_of(cfg.param_dtype))


def normal_init(cfg: ModelConfig):
    return nn.initializers.normal(stddev=cfg.initializer_range)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back to the compute dtype."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(var + cfg.rms_norm_eps)
        return (y * scale.astype(jnp.float32)).astype(dtype_of(cfg.dtype))


# ----------------------------------------------------------------------------- rotary


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] (float32), with "linear" or "llama3" scaling as HF does."""
    dim = cfg.resolved_head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    if rs.type == "linear":
        return (inv_freq / np.float32(rs.factor)).astype(np.float32)
    if rs.type == "llama3":
        old_len = rs.original_max_position_embeddings
        low_wavelen = old_len / rs.low_freq_factor
        high_wavelen = old_len / rs.high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(rs.factor), inv_freq)
        smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_scaling.type {rs.type!r} (llama3 or linear)")


def rope_cos_sin(cfg: ModelConfig, positions):
    """cos and sin [B, S, head_dim] (float32) for integer ``positions`` [B, S].

    Each angle's cos and sin are computed once and spread to both halves of head_dim by a
    product with ``[I I]`` (exact: every output is one input times 1.0 plus zeros). Written as
    elementwise ops, cos and sin were fused into their consumers, the q and k rotations of every
    layer, forward and backward, and recomputed for every head there: on XLA:CPU a scalar libm
    call per element, about 1.3% of the 19M benchmark step's CPU time (docs/PERFORMANCE.md).
    XLA:CPU fuses no elementwise op into a product's consumers through the product; an
    optimization barrier around cos and sin left the compiled step unchanged.
    """
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, Dh/2]
    half = inv_freq.shape[0]
    spread = jnp.tile(jnp.eye(half, dtype=jnp.float32), (1, 2))  # [Dh/2, Dh] = [I I]
    both = jnp.stack([jnp.cos(angles), jnp.sin(angles)])  # [2, B, S, Dh/2]
    both = jnp.einsum("cbsh,hd->cbsd", both, spread, precision=jax.lax.Precision.HIGHEST)
    return both[0], both[1]


def apply_rope(x, cos, sin):
    """Rotate ``x`` [B, S, N, Dh] by the "rotate_half" convention (HF's; no weight permutation)."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- MLP


def can_fuse(names: Sequence[str], rows: int) -> bool:
    """Whether to concatenate kernels whose output axes have these logical names, for ``rows``
    token rows: few rows (see FUSE_MAX_ROWS), and the axes not split over devices (kernels split
    over a tensor axis would need communication to concatenate)."""
    return FUSE_PROJECTIONS and rows <= FUSE_MAX_ROWS and unsplit(names)


def unsplit(names: Sequence[str]) -> bool:
    """True when no axis with these logical names is split over devices under the active mesh
    (no mesh, or the mesh axes the rules map them to have size 1)."""
    mesh = active_mesh()
    if mesh is None:
        return True
    for name in names:
        spec = logical_to_spec((name,), mesh)
        axes = spec[0] if len(spec) else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if math.prod(mesh.shape[a] for a in axes) > 1:
            return False
    return True


def fused_projections(x, kernels: Sequence, dtype):
    """``[x @ k for k in kernels]`` (k [D, ...out dims]) as one product; outputs keep their shapes."""
    flat = [k.reshape(k.shape[0], -1).astype(dtype) for k in kernels]
    y = jnp.einsum("bsd,df->bsf", x.astype(dtype), jnp.concatenate(flat, axis=1))
    outs, start = [], 0
    for k, f in zip(kernels, flat):
        outs.append(y[..., start:start + f.shape[1]].reshape(x.shape[:2] + k.shape[1:]))
        start += f.shape[1]
    return outs


# ----------------------------------------------------------------------------- weight-major


# The decode layout (gorilla_jax/model/decode_layout.py) stores kernels as [out, in]. For at
# most this many token rows, :func:`project_out_in` then computes the product weight-major.
WEIGHT_MAJOR_ROWS = 64


def project_out_in(x, w, dtype, preferred_element_type=None):
    """``x`` [B, S, K] times a kernel stored as ``w`` [N, K] (out, in): [B, S, N].

    For at most ``WEIGHT_MAJOR_ROWS`` token rows (decoding) the product is computed as
    ``w @ x^T`` -> [N, rows] and transposed: with the weight as the left operand, XLA:CPU's
    matmul streams it once instead of repacking it for every call (measured on the
    SmolLM2-135M shapes at 16 rows: gate/up 18.3 -> 14.9 ms, down 9.9 -> 5.8 ms for 30 layers;
    docs/PERFORMANCE.md). The optimization barrier keeps XLA from folding the small transpose
    back into the product (which would restore the slow order). More rows: ``x @ w^T``.
    """
    B, S, K = x.shape
    x, w = x.astype(dtype), w.astype(dtype)
    if B * S > WEIGHT_MAJOR_ROWS:
        return jnp.einsum("bsk,nk->bsn", x, w, preferred_element_type=preferred_element_type)
    y = jnp.einsum("nk,mk->nm", w, x.reshape(B * S, K), preferred_element_type=preferred_element_type)
    return jax.lax.optimization_barrier(y).T.reshape(B, S, w.shape[0])


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), bias-free."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        D, F = cfg.hidden_size, cfg.intermediate_size
        init = normal_init(cfg)
        dt = dtype_of(cfg.dtype)
        if self.has_variable("params", "gate_up_t"):  # the decode layout (model/decode_layout.py)
            gate_up = project_out_in(x, self.get_variable("params", "gate_up_t"), dt)
            h = nn.silu(gate_up[..., :F]) * gate_up[..., F:]
            h = with_logical_constraint(h, ("batch", "length", "mlp"))
            return project_out_in(h, self.get_variable("params", "down_t"), dt)
        wg = kernel(self, "gate_proj", (D, F), ("embed", "mlp"), init)
        wu = kernel(self, "up_proj", (D, F), ("embed", "mlp"), init)
        wd = kernel(self, "down_proj", (F, D), ("mlp", "embed"), init)
        return swiglu(x.astype(dt), wg.astype(dt), wu.astype(dt), wd.astype(dt))


_H_AXES = ("batch", "length", "mlp")


def materialised_transpose(x, axes=None):
    """``jnp.transpose(x, axes)``, written out: the optimization barrier keeps XLA from folding
    the transpose into the next product as a transposed operand, which XLA:CPU runs as a generic
    (non-YNNPACK) dot, often behind transposing copies of its own. Used for the operands of the
    hand-written backward passes' weight-gradient and transposed products."""
    return jax.lax.optimization_barrier(jnp.transpose(x, axes))


def computed_after(x, dependency):
    """``x + 0 * dependency[0, ..., 0]``: a data dependency, so that what is computed from the
    result waits until ``dependency`` exists.

    The hand-written backward passes use it on their forward residuals, with the incoming
    cotangent: XLA:CPU otherwise computes their backward-only values (the SwiGLU activations
    and their transposes, the attention probabilities' transpose) during the forward pass and
    keeps them alive through the rest of it. Optimization barriers do not order XLA:CPU's ops;
    data dependencies do. On the 19M benchmark step: temporaries 333 -> 278 MB. It changes no
    finite value (``-0.0`` becomes ``0.0``); a non-finite element makes the result NaN, as the
    gradient would be. Under a multi-device mesh it returns ``x``: that one element lives on one
    device, and fetching it would be a collective.
    """
    mesh = active_mesh()
    if mesh is not None and mesh.size > 1:
        return x
    return x + 0.0 * dependency[(0,) * dependency.ndim].astype(x.dtype)


@jax.custom_vjp
def swiglu(x, wg, wu, wd):
    """``down(silu(x @ wg) * (x @ wu))`` for x [B, S, D], with a hand-written backward pass.

    Autodiff's backward ran the weight gradients as generic dots over transposed copies that
    it computed twice (once per layout) from the same elementwise expressions; here the
    elementwise gradient is computed once, and the transposed operands of the three
    weight-gradient products (x^T, and dy^T for d_wd, whose [D, F] result is transposed back)
    are materialised (:func:`materialised_transpose`). Measured on the 19M benchmark shapes
    (four layers, forward + backward, 1024 rows): 93-100 -> 75-84 ms.
    """
    return _swiglu_fwd(x, wg, wu, wd)[0]


def _swiglu_fwd(x, wg, wu, wd):
    if can_fuse(("mlp",), x.shape[0] * x.shape[1]):
        gate, up = fused_projections(x, (wg, wu), x.dtype)
    else:
        gate = jnp.einsum("bsd,df->bsf", x, wg)
        up = jnp.einsum("bsd,df->bsf", x, wu)
    h = with_logical_constraint(nn.silu(gate) * up, _H_AXES)
    return jnp.einsum("bsf,fd->bsd", h, wd), (x, gate, up, wg, wu, wd)


def _swiglu_bwd(res, dy):
    x, gate, up, wg, wu, wd = res
    # the activations and x's transpose are computed here, in the backward (computed_after)
    x, gate, up = (computed_after(r, dy) for r in (x, gate, up))
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    h = silu * up
    dh = jnp.einsum("bsd,fd->bsf", dy, wd)
    d_up = with_logical_constraint(dh * silu, _H_AXES)
    d_gate = with_logical_constraint(dh * up * sig * (1 + gate * (1 - sig)), _H_AXES)
    dx = jnp.einsum("bsf,df->bsd", d_gate, wg) + jnp.einsum("bsf,df->bsd", d_up, wu)
    xt = materialised_transpose(x, (2, 0, 1))  # [D, B, S]
    d_wg = jnp.einsum("dbs,bsf->df", xt, d_gate)
    d_wu = jnp.einsum("dbs,bsf->df", xt, d_up)
    # d_wd as ([D, F] = dy^T h)^T: XLA:CPU fuses h's elementwise computation into a transpose
    # of h, and that loop reads its inputs with the transpose's stride (19M benchmark step on
    # a 2-core Zen 1 CPU: ~15 ms per layer for [1024, 688]); dy is already written out, so its
    # transpose is a plain copy, and h is read in its own order by the product
    d_wd_t = jnp.einsum("dbs,bsf->df", materialised_transpose(dy, (2, 0, 1)), h)
    # the barrier before the transpose too: XLA otherwise folds the transpose into the product,
    # which then contracts h's leading axis and runs as a generic (non-YNNPACK) dot
    return dx, d_wg, d_wu, materialised_transpose(jax.lax.optimization_barrier(d_wd_t))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.custom_vjp
def embedding_lookup(table, ids):
    """``table[ids]`` (rows of a [V, D] table), whose gradient (zeros, then the rows' cotangents
    added in) is only started once the cotangent exists (:func:`computed_after`): autodiff's
    zero fill has no operands, and XLA:CPU ran it early in the forward pass, keeping the [V, D]
    gradient buffer (33 MB for the 19M benchmark model) alive beside the logits."""
    return _embedding_lookup_fwd(table, ids)[0]


def _embedding_lookup_fwd(table, ids):
    return jnp.take(table, ids, axis=0), (table, ids)


def _embedding_lookup_bwd(res, ct):
    table, ids = res
    zeros = computed_after(jnp.zeros(table.shape, table.dtype), ct)
    return zeros.at[ids].add(ct.astype(table.dtype)), None


embedding_lookup.defvjp(_embedding_lookup_fwd, _embedding_lookup_bwd)


class Kernel(nn.Module):
    """Holds one projection kernel, so the param tree reads ``<name>/kernel`` like HF's names
    (``gate_proj/kernel``, ``q_proj/kernel``, ...)."""

    config: ModelConfig
    shape: tuple
    axes: tuple
    init: object

    @nn.compact
    def __call__(self):
        return param(self, "kernel", self.shape, self.axes, self.init)


def kernel(parent: nn.Module, name: str, shape, axes, init):
    """The kernel parameter ``<name>/kernel`` of ``parent`` with logical axes ``axes``."""
    return Kernel(parent.config, tuple(shape), tuple(axes), init, name=name)()
