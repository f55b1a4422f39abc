"""Grouped-query causal self-attention with rotary embeddings and an explicit KV cache.

Masks are built once per forward pass (:func:`build_mask`) as a boolean ``[B, S, T]`` array
(query i may attend key j) and shared by all layers. The softmax runs in float32; fully masked
query rows (e.g. left-padding tokens) get a uniform distribution (in the ``xla`` kernel without
a cache, over the keys up to the end of their query block), never NaN.

Kernels (``config.attention``), for the forward pass without a cache:

- ``xla``: einsum + float32 softmax (:func:`dot_product_attention`); runs everywhere. The
  causal queries are split into up to 4 blocks, each scored only against the keys up to its
  end (:func:`causal_query_blocks`); on CPU the batch is also cut into independent parts
  (:func:`attention_batch_parts`). On one CPU device with float32 compute (head dims that are
  multiples of 16) the native kernels of :mod:`gorilla_jax.cpu_kernels.attention` run instead,
  RoPE included (:func:`gorilla_jax.cpu_kernels.attention.applies`); their rows without any
  key are uniform over the keys up to their own position.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU; fp16/bf16 compute).
  On other backends the same call runs with its XLA implementation.
- ``splash``: the Pallas TPU splash-attention kernel with a causal mask and segment ids
  (padding becomes its own segment), under ``shard_map`` over batch and kv-head shards when a
  mesh is active. Needs the sequence length to be a multiple of 128 (else the ``xla`` kernel
  runs); on non-TPU backends it runs in Pallas interpret mode (slow: for testing). Padding
  query rows attend to the padding before them instead of uniformly; their outputs are
  meaningless either way.

The KV-cache path (prefill and decode) always uses the ``xla`` kernel.

KV cache layout (a dict pytree, updated in place inside jit when donated)::

    k: tuple of L arrays [B, KV, T, Dh]      per-layer keys (post-rotary)
    v: tuple of L arrays [B, KV, Dh, T]      per-layer values, slots last
    index: int32 scalar                      the next slot written (the same for the batch)
    mask:  [B, T] bool                       slot holds a real (non-padding) token

One array per layer rather than one stacked [L, ...] array: XLA (CPU at least) updates a
separate buffer in place, while a write into a stacked buffer that is then read copies the
whole cache on every layer (measured: 30 layers, batch 16: ~4 ms vs ~900 ms per step).
Both attention products take the cache as their left operand in its stored order, contracting
its last axis, per (batch, kv head): scores^T = k [T, Dh] x q^T [Dh, G*S] and out^T =
v [Dh, T] x probs^T [T, G*S]; that is the order XLA:CPU gives these products (the cache is the
larger operand), and the one its fast matmul path (YNNPACK) takes. With a [B, T, KV, Dh] cache
XLA copied each layer's whole key cache on every decoded token; with both caches [B, KV, T, Dh]
the value product fell back to a slow generic dot (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gorilla_jax.config import ModelConfig
from gorilla_jax.cpu_kernels import attention as native_attention
from gorilla_jax.model.layers import (apply_rope, can_fuse, computed_after, dtype_of,
                                     fused_projections, kernel, materialised_transpose,
                                     normal_init, project_out_in, unsplit)
from gorilla_jax.sharding import active_mesh, logical_to_spec, with_logical_constraint

# A large finite negative: exp() underflows to exactly 0 without the NaNs of -inf on empty rows.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def build_mask(seq_len: int, segment_ids=None, attention_mask=None):
    """[B or 1, S, S] bool: causal, within a segment, and the key is not padding."""
    idx = jnp.arange(seq_len)
    mask = (idx[:, None] >= idx[None, :])[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, :]
    return mask


def build_cache_mask(cache_mask, index, seq_len: int):
    """[B, S, T] bool for S new tokens at slots [index, index+S) over a cache of T slots."""
    T = cache_mask.shape[1]
    q_slot = index + jnp.arange(seq_len)
    causal = q_slot[:, None] >= jnp.arange(T)[None, :]  # [S, T]
    return causal[None] & cache_mask[:, None, :]


def _gqa_attention(q, k, v, mask, dtype, k_axes: str, v_axes: str):
    """Softmax attention with grouped kv heads; ``k_axes`` / ``v_axes`` spell the key and value
    layouts over b (batch), t (slots), n (kv heads), d (head dim) as einsum subscripts."""
    B, S, H, Dh = q.shape
    KV = k.shape[k_axes.index("n")]
    qg = q.reshape(B, S, KV, H // KV, Dh)
    scores = jnp.einsum(f"bsngd,{k_axes}->bngst", qg, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(Dh ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum(f"bngst,{v_axes}->bsngd", probs, v.astype(dtype))
    return out.reshape(B, S, H, Dh)


# Causal attention's queries are split into blocks of about this many (at least
# CAUSAL_MIN_BLOCK, at most CAUSAL_MAX_BLOCKS blocks; see causal_query_blocks).
CAUSAL_MIN_BLOCK = 32
CAUSAL_MAX_BLOCKS = 4


def causal_query_blocks(seq_len: int) -> int:
    """How many query blocks :func:`dot_product_attention` splits a causal sequence of
    ``seq_len`` into: up to ``CAUSAL_MAX_BLOCKS``, each of at least ``CAUSAL_MIN_BLOCK``
    queries (1, no split, for shorter sequences)."""
    return max(1, min(CAUSAL_MAX_BLOCKS, seq_len // CAUSAL_MIN_BLOCK))


# The CPU backend cuts the batch of the attention cores into this many independent parts
# (see attention_batch_parts).
CPU_BATCH_PARTS = 2


def attention_batch_parts(batch: int) -> int:
    """How many independent parts :func:`dot_product_attention` cuts a batch of ``batch`` rows
    into: ``CPU_BATCH_PARTS`` (at most ``batch``) on CPU devices (those of the active mesh, else
    the default backend) when the batch axis is not split over devices, else 1.

    XLA:CPU runs each batched product of the attention core, [B, KV] small products, on one
    thread, one batch element after another (it splits a product over threads only within one
    large batch element), while independent operations run on different threads. Two
    half-batch cores are independent, so each takes a thread (19M benchmark model on the Zen 1
    CPU: the train step 1-2% faster; four parts were no better; docs/PERFORMANCE.md). A batch
    split over devices is left whole: a slice of it would move rows between devices.
    """
    mesh = active_mesh()  # its devices' platform: `tpu fit` compiles for TPUs from a CPU host
    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    if platform != "cpu" or not unsplit(("batch",)):
        return 1
    return max(1, min(CPU_BATCH_PARTS, batch))


def dot_product_attention(q, k, v, mask, dtype, causal_blocks: int = 1, batch_parts: int = 1):
    """q [B,S,H,Dh], k/v [B,T,KV,Dh], mask [B|1,S,T] bool -> [B,S,H,Dh] in ``dtype``.

    Computed per (batch, kv head) with the head group's queries stacked as rows: q as
    [B, KV, S*G, Dh] (row ``s * G + g``), k/v as [B, KV, T, Dh], so both products have their
    batch axes leading and contract a minor axis, with a hand-written backward pass
    (:func:`_grouped_core`) whose four products do the same. That is the form XLA:CPU runs as
    fast matmuls: with the heads between the sequence and head-dim axes, or with autodiff's
    transposed products, it fell back to copies and generic dots (19M benchmark model on CPU:
    forward + backward per layer ~9 -> ~7 ms; docs/PERFORMANCE.md).

    ``causal_blocks`` > 1 (the caller guarantees a causal mask over S == T: query i never
    attends to a key after i): the queries are split into that many blocks of consecutive
    positions, and each block's scores are computed only against the keys up to its own last
    position; the rest of the [S, T] scores are masked for every query of the block anyway.
    With 4 blocks the products and the softmax cover 10/16 of the scores (19M benchmark model
    on a Zen 1 CPU: one layer's forward + backward 31.0 -> 20.8 ms, the step 1.7% faster;
    docs/PERFORMANCE.md). A fully masked query row (a padding token's, under
    ``attention_mask``) is then uniform over the keys up to its block's end instead of over all
    T; such rows' outputs are meaningless either way (never NaN).

    ``batch_parts`` > 1: the batch is cut into that many parts of consecutive rows (as even as
    the batch allows), each attended on its own (:func:`attention_batch_parts`); the result is
    the same.
    """
    if batch_parts > 1:
        cuts = [q.shape[0] * i // batch_parts for i in range(batch_parts + 1)]
        parts = [dot_product_attention(q[a:b], k[a:b], v[a:b],
                                       mask if mask.shape[0] == 1 else mask[a:b], dtype,
                                       causal_blocks)
                 for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        return jnp.concatenate(parts, axis=0)
    B, S, H, Dh = q.shape
    T, KV = k.shape[1], k.shape[2]
    G = H // KV
    qh = q.astype(dtype).reshape(B, S, KV, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, KV, S * G, Dh)
    kh = k.astype(dtype).transpose(0, 2, 1, 3)
    vh = v.astype(dtype).transpose(0, 2, 1, 3)
    scale = Dh ** -0.5
    if causal_blocks > 1:
        if S != T:
            raise ValueError(f"causal query blocks need as many queries as keys; got {S} and {T}")
        ends = [S * (i + 1) // causal_blocks for i in range(causal_blocks)]
        outs = [_grouped_core(qh[:, :, a * G:b * G], kh[:, :, :b], vh[:, :, :b], mask[:, a:b, :b],
                              scale)
                for a, b in zip([0] + ends[:-1], ends)]
        out = jnp.concatenate(outs, axis=2)
    else:
        out = _grouped_core(qh, kh, vh, mask, scale)
    return out.reshape(B, KV, S, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, S, H, Dh)


def _grouped_where(mask, x, fill):
    """``x`` [B, KV, S*G, T] (row ``s * G + g``) where ``mask`` [B|1, S, T] holds, else ``fill``."""
    B, KV, M, T = x.shape
    S = mask.shape[1]
    x = jnp.where(mask[:, None, :, None], x.reshape(B, KV, S, M // S, T), fill)
    return x.reshape(B, KV, M, T)


def _grouped_probs(qh, kh, mask, scale):
    """Softmax probabilities [B, KV, S*G, T] (float32) of grouped queries over the keys."""
    scores = jnp.einsum("bnmd,bntd->bnmt", qh, kh, preferred_element_type=jnp.float32)
    scores = _grouped_where(mask, scores * jnp.float32(scale), _MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_core(qh, kh, vh, mask, scale: float):
    """softmax(mask(qh kh^T * scale)) vh: qh [B,KV,S*G,Dh], kh/vh [B,KV,T,Dh], mask [B|1,S,T]."""
    return _grouped_core_fwd(qh, kh, vh, mask, scale)[0]


def _grouped_core_fwd(qh, kh, vh, mask, scale):
    probs = _grouped_probs(qh, kh, mask, scale)
    out = jnp.einsum("bnmt,bntd->bnmd", probs.astype(vh.dtype), vh)
    return out, (qh, kh, vh, mask, probs)


def _grouped_core_bwd(scale, res, d_out):
    qh, kh, vh, mask, probs = res
    probs = computed_after(probs, d_out)  # so its transpose is made here, not in the forward
    dt = qh.dtype
    d_probs = jnp.einsum("bnmd,bntd->bnmt", d_out, vh, preferred_element_type=jnp.float32)
    probs_t = materialised_transpose(probs.astype(dt), (0, 1, 3, 2))
    dv = jnp.einsum("bntm,bnmd->bntd", probs_t, d_out.astype(dt))
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    # masked scores are constants: no gradient, also on fully masked (uniform) rows
    d_scores = (_grouped_where(mask, d_scores, 0.0) * jnp.float32(scale)).astype(dt)
    dq = jnp.einsum("bnmt,bntd->bnmd", d_scores, kh)
    dk = jnp.einsum("bntm,bnmd->bntd", materialised_transpose(d_scores, (0, 1, 3, 2)), qh)
    return dq, dk.astype(kh.dtype), dv.astype(vh.dtype), None


_grouped_core.defvjp(_grouped_core_fwd, _grouped_core_bwd)


def cached_attention(q, k, v, mask, dtype):
    """Attention over a KV cache: q [B,S,H,Dh], k [B,KV,T,Dh], v [B,KV,Dh,T] (the cache
    layout), mask [B,S,T] bool -> [B,S,H,Dh] in ``dtype``."""
    return _gqa_attention(q, k, v, mask, dtype, "bntd", "bndt")


def cudnn_attention(q, k, v, mask, dtype):
    """``jax.nn.dot_product_attention`` (cuDNN fused kernel on GPU, its XLA path elsewhere)."""
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                       mask=jnp.broadcast_to(mask[:, None], (q.shape[0], 1) + mask.shape[1:]),
                                       implementation=impl)
    return out.astype(dtype)


def splash_attention(q, k, v, segment_ids, attention_mask, dtype):
    """Causal, segment-aware attention with the Pallas splash kernel; None if S % 128 != 0."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, S, H, Dh = q.shape
    KV = k.shape[2]
    G = H // KV
    block = next((b for b in (512, 256, 128) if S % b == 0), None)
    if block is None:
        return None
    seg = (jnp.zeros((B, S), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    if attention_mask is not None:
        seg = jnp.where(attention_mask.astype(bool), seg, -1)
    qh = (q * jnp.asarray(Dh ** -0.5, q.dtype)).reshape(B, S, KV, G, Dh).transpose(0, 2, 3, 1, 4)
    kh = k.transpose(0, 2, 1, 3)
    vh = v.astype(q.dtype).transpose(0, 2, 1, 3)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    interpret = jax.default_backend() != "tpu"

    def local(qh, kh, vh, seg):
        mask = sm.MultiHeadMask([sm.CausalMask((S, S)) for _ in range(G)])
        kernel = sk.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)

        def one(q1, k1, v1, s1):  # q1 [G,S,Dh], k1/v1 [S,Dh], s1 [S]
            return kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1))

        over_kv = jax.vmap(one, in_axes=(0, 0, 0, None))
        return jax.vmap(over_kv)(qh, kh, vh, seg)

    mesh = active_mesh()
    if mesh is None:
        out = local(qh, kh, vh, seg)
    else:
        spec = logical_to_spec(("batch", "kv_heads"), mesh, shape=(B, KV))
        b_ax = spec[0] if len(spec) > 0 else None
        h_ax = spec[1] if len(spec) > 1 else None
        P = jax.sharding.PartitionSpec
        out = jax.shard_map(local, mesh=mesh,
                            in_specs=(P(b_ax, h_ax), P(b_ax, h_ax), P(b_ax, h_ax), P(b_ax)),
                            out_specs=P(b_ax, h_ax), check_vma=False)(qh, kh, vh, seg)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, S, H, Dh).astype(dtype)


class Attention(nn.Module):
    """Self-attention: q/k/v projections, RoPE, GQA softmax attention, output projection.

    ``cache``: None, or ``(k, v, index)``: this layer's cache arrays (k [B,KV,T,Dh],
    v [B,KV,Dh,T]) and the first slot to write. Returns ``(out, (k, v))`` with the new keys/values
    written (``(out, None)`` without a cache).
    Params: q/k/v/o_proj kernels, or in the decode layout ``qkv_t`` and ``o_t``
    (model/decode_layout.py).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, segment_ids=None, attention_mask=None):
        cfg = self.config
        D, H, KV, Dh = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.resolved_head_dim)
        dt = dtype_of(cfg.dtype)
        init = normal_init(cfg)
        x = x.astype(dt)
        B, S = x.shape[:2]
        out_in = self.has_variable("params", "qkv_t")  # the decode layout (model/decode_layout.py)
        wo = None
        if out_in:
            qkv = project_out_in(x, self.get_variable("params", "qkv_t"), dt)
            q, k, v = jnp.split(qkv, (H * Dh, (H + KV) * Dh), axis=-1)
            q, k, v = (q.reshape(B, S, H, Dh), k.reshape(B, S, KV, Dh), v.reshape(B, S, KV, Dh))
        else:
            wq = kernel(self, "q_proj", (D, H, Dh), ("embed", "heads", "head_dim"), init)
            wk = kernel(self, "k_proj", (D, KV, Dh), ("embed", "kv_heads", "head_dim"), init)
            wv = kernel(self, "v_proj", (D, KV, Dh), ("embed", "kv_heads", "head_dim"), init)
            wo = kernel(self, "o_proj", (H, Dh, D), ("heads", "head_dim", "embed"), init)
            if can_fuse(("heads", "kv_heads"), B * S):
                q, k, v = fused_projections(x, (wq, wk, wv), dt)
            else:
                q = jnp.einsum("bsd,dhk->bshk", x, wq.astype(dt))
                k = jnp.einsum("bsd,dhk->bshk", x, wk.astype(dt))
                v = jnp.einsum("bsd,dhk->bshk", x, wv.astype(dt))
        if (cache is None and cfg.attention == "xla"
                and native_attention.applies(q, k, dt, cos)):
            # one CPU device: the native kernels, which also apply the rotary embedding
            return self._project_out(native_attention.causal_attention(
                q, k, v, mask, cos, sin, Dh ** -0.5), out_in, wo, dt), None
        q = with_logical_constraint(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = with_logical_constraint(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        v = with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))

        new_cache = None
        if cache is not None:
            k_cache, v_cache, index = cache
            zero = jnp.zeros((), jnp.int32)
            k_cache = jax.lax.dynamic_update_slice(
                k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), (zero, zero, index, zero))
            v_cache = jax.lax.dynamic_update_slice(
                v_cache, v.transpose(0, 2, 3, 1).astype(v_cache.dtype), (zero, zero, zero, index))
            new_cache = (k_cache, v_cache)
            out = cached_attention(q, k_cache.astype(dt), v_cache, mask, dt)
        else:
            out = None
            if cfg.attention == "splash":  # None where the kernel does not apply (see there)
                out = splash_attention(q, k, v, segment_ids, attention_mask, dt)
            elif cfg.attention == "cudnn":
                out = cudnn_attention(q, k, v, mask, dt)
            if out is None:
                out = dot_product_attention(q, k, v, mask, dt, causal_query_blocks(S),
                                            attention_batch_parts(B))
        return self._project_out(out, out_in, wo, dt), new_cache

    def _project_out(self, out, out_in: bool, wo, dt):
        """The output projection of the heads' outputs [B, S, H, Dh] -> [B, S, D]."""
        B, S = out.shape[:2]
        out = with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        if out_in:
            return project_out_in(out.reshape(B, S, -1), self.get_variable("params", "o_t"), dt)
        return jnp.einsum("bshk,hkd->bsd", out, wo.astype(dt))
