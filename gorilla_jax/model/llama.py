"""The Flax (Linen) LLaMA causal LM: decoder layers, scan/remat, KV cache, parameter helpers.

CONTRACT CHANGE (vs. the original brief): the KV cache holds one array per layer,
``cache['k']`` / ``cache['v']`` are tuples of L arrays (keys [B, KV, T, Dh], values
[B, KV, Dh, T]; see model/attention.py), not one stacked
[L, B, KV, T, Dh] array: XLA updates separate buffers in place, while writing into a stacked
buffer that is read again copies the whole cache on every layer (30 layers, batch 16 on CPU:
~260 ms vs ~900 ms extra per decode step). ``index`` and ``mask`` are as specified. Extra
keyword ``last_only`` (logits of the last position only, for prefill).

Public API (the contract other modules build on)::

    model = LlamaForCausalLM(config)
    logits = model.apply({'params': params}, input_ids, positions=None, segment_ids=None,
                         attention_mask=None)                       # [B, S, V] float32
    logits, cache = model.apply({'params': params}, input_ids, positions=..., attention_mask=...,
                                cache=cache)                        # KV-cache path
    params = init_params(config, rng)          # unscanned or scanned per config.scan_layers
    cache = init_cache(config, batch_size, max_len, dtype=None)
    axes = param_logical_axes(config)          # same tree as params, tuples of logical names
    stack_layers(params, num_layers) / unstack_layers(params, num_layers)

Conventions:

- ``positions`` [B, S] int: rotary positions. Default: ``arange(S)`` (plus ``cache['index']``
  when a cache is given). Packed rows pass per-segment positions that restart at 0; generation
  with left padding passes ``cumsum(attention_mask) - 1``.
- ``segment_ids`` [B, S] int: a token attends only to earlier tokens with the same segment id.
  Padding may use any id of its own (the data pipeline uses 0); its outputs are meaningless
  and must be masked out of the loss. Not supported together with ``cache``.
- ``attention_mask`` [B, S] (1 = real token, 0 = padding): padding keys are never attended to.
- With ``cache``: the S new tokens' keys/values are written to slots ``[index, index+S)`` (the
  caller keeps ``index + S <= T``); they attend to every valid cached slot up to their own.
  ``attention_mask`` marks which of the new tokens are real (default: all).
- ``last_only=True`` returns logits for the last position only ([B, 1, V]): what prefill needs.
- ``return_hidden=True`` returns the final-normed hidden states [B, S, D] (compute dtype)
  instead of logits: the train step applies the head itself, fused with the loss
  (``gorilla_jax.train.step.head_loss_sums``), and never materialises [B, S, V] gradients.

Param tree (unscanned; with ``scan_layers`` the ``layers_i`` subtrees are stacked under
``layers`` with a leading [L] axis)::

    embed_tokens/embedding [V,D]; layers_i/{input_layernorm/scale [D],
    self_attn/{q_proj [D,H,Dh], k_proj [D,KV,Dh], v_proj [D,KV,Dh], o_proj [H,Dh,D]}/kernel,
    post_attention_layernorm/scale [D], mlp/{gate_proj [D,F], up_proj [D,F], down_proj [F,D]}/kernel};
    norm/scale [D]; lm_head/kernel [D,V] (absent with tie_word_embeddings)

The model also runs on the *decode layout* of that tree (model/decode_layout.py: projection
kernels transposed to [out, in] and fused), which generation uses on CPU.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gorilla_jax.config import ModelConfig
from gorilla_jax.model.attention import Attention, build_cache_mask, build_mask
from gorilla_jax.model.layers import (MLP, RMSNorm, dtype_of, embedding_lookup, normal_init, param,
                                     project_out_in, rope_cos_sin)
from gorilla_jax.sharding import with_logical_constraint

HIDDEN_AXES = ("batch", "length", "activation_embed")

class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

    ``layer_cache``: None, or this layer's ``(k, v)`` cache arrays [B, T, KV, Dh]; returns
    ``(x, new_layer_cache)`` so the same body serves unrolled layers and ``nn.scan``.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, cache_index, segment_ids=None,
                 attention_mask=None):
        cfg = self.config
        cache = None if layer_cache is None else (layer_cache[0], layer_cache[1], cache_index)
        h = RMSNorm(cfg, name="input_layernorm")(x)
        attn, new_cache = Attention(cfg, name="self_attn")(h, cos, sin, mask, cache, segment_ids,
                                                           attention_mask)
        x = x + attn
        h = RMSNorm(cfg, name="post_attention_layernorm")(x)
        x = x + MLP(cfg, name="mlp")(h)
        x = with_logical_constraint(x, HIDDEN_AXES)
        return x, new_cache


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _layer_class(cfg: ModelConfig):
    if cfg.remat == "none":
        return DecoderLayer
    if cfg.remat not in _REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of none, {', '.join(_REMAT_POLICIES)}; "
                         f"got {cfg.remat!r}")
    return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat],
                    prevent_cse=not cfg.scan_layers)


class LlamaForCausalLM(nn.Module):
    """LLaMA-architecture decoder-only LM (see the module docstring for the call convention)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, positions=None, segment_ids=None, attention_mask=None,
                 cache: Optional[dict] = None, last_only: bool = False,
                 return_hidden: bool = False):
        cfg = self.config
        B, S = input_ids.shape
        dt = dtype_of(cfg.dtype)
        embedding = _Embedding(cfg, name="embed_tokens")()

        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
        if positions is None:
            start = cache["index"] if cache is not None else 0
            positions = jnp.broadcast_to(start + jnp.arange(S, dtype=jnp.int32), (B, S))
        if cache is None:
            mask = build_mask(S, segment_ids, attention_mask)
            index = None
            layer_caches = [None] * cfg.num_hidden_layers
        else:
            index = jnp.asarray(cache["index"], jnp.int32)
            new_valid = (jnp.ones((B, S), bool) if attention_mask is None
                         else attention_mask.astype(bool))
            cache_mask = jax.lax.dynamic_update_slice(cache["mask"], new_valid, (0, index))
            mask = build_cache_mask(cache_mask, index, S)
            layer_caches = list(zip(cache["k"], cache["v"]))

        x = embedding_lookup(embedding, input_ids).astype(dt)
        x = with_logical_constraint(x, HIDDEN_AXES)
        cos, sin = rope_cos_sin(cfg, positions)

        layer_cls = _layer_class(cfg)
        if cfg.scan_layers:
            # The scanned body reads/writes stacked [L, ...] caches: correct, but the cache is
            # restacked every call; generation unstacks scanned params and runs unrolled.
            xs = None if cache is None else tuple(jnp.stack(c) for c in (cache["k"], cache["v"]))
            stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0,) + (nn.broadcast,) * 6,
                            length=cfg.num_hidden_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, ys = stack(cfg, name="layers")(x, xs, cos, sin, mask, index, segment_ids,
                                              attention_mask)
            new_caches = [None] if ys is None else list(zip(*(tuple(a) for a in ys)))
        else:
            new_caches = []
            for i in range(cfg.num_hidden_layers):
                x, c = layer_cls(cfg, name=f"layers_{i}")(x, layer_caches[i], cos, sin, mask,
                                                          index, segment_ids, attention_mask)
                new_caches.append(c)

        if last_only:
            x = x[:, -1:]
        x = RMSNorm(cfg, name="norm")(x)
        if return_hidden:
            out = x
        else:
            if cfg.tie_word_embeddings:  # the embedding is [V, D]: an [out, in] kernel
                logits = project_out_in(x, embedding, dt, jnp.float32)
            elif self.has_variable("params", "lm_head_t"):  # the decode layout
                logits = project_out_in(x, self.get_variable("params", "lm_head_t"), dt,
                                        jnp.float32)
            else:
                kernel = _LMHead(cfg, name="lm_head")()
                logits = jnp.einsum("bsd,dv->bsv", x, kernel.astype(dt),
                                    preferred_element_type=jnp.float32)
            out = with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        if cache is None:
            return out
        return out, {"k": tuple(c[0] for c in new_caches), "v": tuple(c[1] for c in new_caches),
                        "index": index + S, "mask": cache_mask}


class _Embedding(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self):
        cfg = self.config
        return param(self, "embedding", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                     normal_init(cfg))


class _LMHead(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self):
        cfg = self.config
        return param(self, "kernel", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                     normal_init(cfg))


# ----------------------------------------------------------------------------- helpers


def _boxed_init(config: ModelConfig, rng):
    model = LlamaForCausalLM(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, ids)["params"]


# Up to this many parameters, init_params draws all weights from one normal stream: XLA's CPU
# compile of a threefry kernel per parameter costs ~0.5 s each (10 s for a 2-layer model).
ONE_STREAM_MAX_PARAMS = 1 << 28


def init_params(config: ModelConfig, rng, *, one_stream: Optional[bool] = None) -> dict:
    """Random parameters (HF's init: normal(initializer_range), norm scales 1), plain arrays.

    Layout follows ``config.scan_layers``. ``one_stream`` (default: models up to
    ``ONE_STREAM_MAX_PARAMS``): draw every weight from one flat normal vector (fast to compile);
    otherwise each parameter's own initializer runs (better for large sharded inits).
    Traceable: ``jax.jit(functools.partial(init_params, config), out_shardings=
    gorilla_jax.sharding.param_shardings(config, mesh))(rng)`` initialises a model sharded.
    """
    key = (repr(config), one_stream)
    fn = _INIT_FNS.get(key)
    if fn is None:
        abstract = abstract_params(config)
        use_stream = (count_params(abstract) <= ONE_STREAM_MAX_PARAMS if one_stream is None
                      else one_stream)
        if use_stream:
            fn = jax.jit(functools.partial(_one_stream_init, config, abstract))
        else:
            fn = jax.jit(lambda r: nn.meta.unbox(_boxed_init(config, r)))
        _INIT_FNS[key] = fn
    return fn(rng)


_INIT_FNS: dict = {}  # compiled init functions by config (ModelConfig is not hashable)


def _one_stream_init(config: ModelConfig, abstract, rng):
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    is_scale = [getattr(path[-1], "key", None) == "scale" for path, _ in flat]
    sizes = [int(np.prod(x.shape)) for (_, x), scale in zip(flat, is_scale) if not scale]
    noise = jax.random.normal(rng, (sum(sizes),), jnp.float32) * config.initializer_range
    out, offset = [], 0
    for (_, x), scale in zip(flat, is_scale):
        if scale:
            out.append(jnp.ones(x.shape, x.dtype))
            continue
        size = int(np.prod(x.shape))
        out.append(noise[offset:offset + size].reshape(x.shape).astype(x.dtype))
        offset += size
    return jax.tree_util.tree_unflatten(treedef, out)


def abstract_params(config: ModelConfig) -> dict:
    """The param tree as ``jax.ShapeDtypeStruct`` leaves (no memory allocated)."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, config), jax.random.PRNGKey(0))
    return nn.meta.unbox(boxed)


def param_logical_axes(config: ModelConfig) -> dict:
    """A tree matching the params whose leaves are tuples of logical axis names."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, config), jax.random.PRNGKey(0))
    return jax.tree.map(lambda b: tuple(b.names), boxed,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


# The KV cache layout (see model/attention.py): logical axes of each layer's key / value array.
CACHE_LAYOUT = {"k": ("batch", "kv_heads", "cache_length", "head_dim"),
                "v": ("batch", "kv_heads", "head_dim", "cache_length")}


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache of ``max_len`` slots (see gorilla_jax.model.attention for the layout)."""
    dt = jnp.dtype(dtype if dtype is not None else config.dtype)
    sizes = {"batch": batch_size, "kv_heads": config.num_key_value_heads,
             "cache_length": max_len, "head_dim": config.resolved_head_dim}
    layers = range(config.num_hidden_layers)
    return {**{kind: tuple(jnp.zeros(tuple(sizes[a] for a in axes), dt) for _ in layers)
               for kind, axes in CACHE_LAYOUT.items()},
            "index": jnp.zeros((), jnp.int32), "mask": jnp.zeros((batch_size, max_len), bool)}


def cache_logical_axes(config: ModelConfig) -> dict:
    """Logical axis names of the cache arrays (for sharding a generation batch)."""
    L = config.num_hidden_layers
    return {**{kind: (axes,) * L for kind, axes in CACHE_LAYOUT.items()},
            "index": (), "mask": ("batch", "cache_length")}


def _stack_fn(leaves):
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def stack_layers(params: dict, num_layers: int) -> dict:
    """Unscanned ``layers_0..layers_{L-1}`` -> scanned ``layers`` with a leading [L] axis."""
    missing = [f"layers_{i}" for i in range(num_layers) if f"layers_{i}" not in params]
    if missing:
        raise KeyError(f"stack_layers: params lack {', '.join(missing)}")
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: _stack_fn(xs),
                                 *[params[f"layers_{i}"] for i in range(num_layers)])
    return out


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Scanned ``layers`` [L, ...] -> unscanned ``layers_0..layers_{L-1}``."""
    if "layers" not in params:
        raise KeyError("unstack_layers: params have no scanned 'layers' subtree")
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
