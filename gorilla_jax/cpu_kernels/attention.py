"""Causal grouped-query attention for training on one CPU device, through the native kernels
in ``attention.cc`` (forward and a hand-written backward, as XLA FFI calls).

XLA:CPU runs the attention core of model/attention.py (:func:`dot_product_attention`) as many
small batched products with layout transposes, slices, pads and copies around them, and the
rotary embedding and its backward as separate passes. The kernels apply the rotary embedding
as they copy q and k in, do one (batch row, kv head) at a time with its keys and values in
cache, skip the keys after each query tile (causal), and save only each query row's
log-sum-exp for the backward, which recomputes the probabilities (19M benchmark model: the
train step 3.3% faster; docs/PERFORMANCE.md).

:func:`applies` says when :class:`gorilla_jax.model.attention.Attention` uses them: the kernels
are usable (:func:`gorilla_jax.cpu_kernels.usable`: one CPU device, not switched off, built),
float32 compute, a head dimension that is a multiple of 16, and as many keys as queries (no
KV cache). Queries whose mask row is empty get a uniform distribution over the keys up to
their own position (model/attention.py's blocks: up to their block's end); their outputs are
meaningless either way.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gorilla_jax import cpu_kernels


def applies(q, k, dtype, cos) -> bool:
    """Whether :func:`causal_attention` runs for q [B,S,H,Dh], k [B,T,KV,Dh] in ``dtype`` with
    the rotary embedding's ``cos`` (and sin) [B,S,Dh]."""
    B, S, H, Dh = q.shape
    return (jnp.dtype(dtype) == jnp.float32 and tuple(cos.shape) == (B, S, Dh)
            and q.dtype == jnp.float32 and k.dtype == jnp.float32 and k.shape[1] == S
            and H % k.shape[2] == 0 and Dh % 16 == 0 and Dh <= 1024 and cpu_kernels.usable())


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def causal_attention(q, k, v, mask, cos, sin, scale: float):
    """softmax(mask(rope(q) rope(k)^T * scale)) v over keys j <= i.

    q [B,S,H,Dh], k/v [B,S,KV,Dh] float32, q and k before the rotary embedding (KV dividing H:
    query head h reads kv head h // (H / KV)); mask [1 or B, S, S] bool (query i may attend key
    j); cos, sin [B,S,Dh] float32 (:func:`gorilla_jax.model.layers.rope_cos_sin`), applied as
    :func:`gorilla_jax.model.layers.apply_rope` does -> [B,S,H,Dh] float32. cos and sin get no
    gradient (zeros: they are functions of the integer positions).
    """
    return _forward(q, k, v, mask, cos, sin, scale)[0]


def _require_library():
    if not cpu_kernels.available():
        raise RuntimeError("the native attention kernel is not built: "
                           f"{cpu_kernels.unavailable_reason()}")


def _forward(q, k, v, mask, cos, sin, scale):
    _require_library()
    B, S, H, _ = q.shape
    KV = k.shape[2]
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
              jax.ShapeDtypeStruct((B, KV, S * (H // KV)), jnp.float32))
    with jax.named_scope("attention_fwd"):  # its name in profiles (bench train --profile)
        return jax.ffi.ffi_call("gorilla_attention_fwd", shapes)(
            q, k, v, mask.astype(jnp.bool_), cos, sin, scale=np.float32(scale))


def _fwd(q, k, v, mask, cos, sin, scale):
    out, lse = _forward(q, k, v, mask, cos, sin, scale)
    return out, (q, k, v, mask, cos, sin, out, lse)


def _bwd(scale, res, d_out):
    q, k, v, mask, cos, sin, out, lse = res
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    with jax.named_scope("attention_bwd"):
        dq, dk, dv = jax.ffi.ffi_call("gorilla_attention_bwd", shapes)(
            q, k, v, mask.astype(jnp.bool_), cos, sin, out, lse, d_out.astype(jnp.float32),
            scale=np.float32(scale))
    return dq, dk, dv, None, jnp.zeros_like(cos), jnp.zeros_like(sin)


causal_attention.defvjp(_fwd, _bwd)
