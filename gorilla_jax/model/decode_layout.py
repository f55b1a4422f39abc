"""The decode layout: projection kernels stored [out, in] and fused, for generation on CPU.

The model's parameters keep HF's names and Flax's [in, out] kernels (training, checkpoints,
sharding rules and the HF round trip all read that tree). For decoding on XLA:CPU, where each
step multiplies a few token rows by every weight, :func:`to_decode_layout` makes a second tree
in which each layer's projections are stored transposed, with those that read the same input
concatenated::

    layers_i/self_attn/qkv_t    [(H + 2 KV) * Dh, D]   q, k and v kernels, in that order
    layers_i/self_attn/o_t      [D, H * Dh]
    layers_i/mlp/gate_up_t      [2 F, D]               gate, then up
    layers_i/mlp/down_t         [D, F]
    lm_head_t                   [V, D]                 untied heads only (a tied head is the
                                                       [V, D] embedding already)

The model reads these variables when they are present (``Attention``, ``MLP`` and the head,
through :func:`gorilla_jax.model.layers.project_out_in`): for at most ``WEIGHT_MAJOR_ROWS``
token rows every product is computed weight-major (``w @ x^T``), which XLA:CPU runs without
repacking the weight on every call; longer inputs (the prompt) use ``x @ w^T``, as fast as
the [in, out] form. Measured on the SmolLM2-135M shape, fp32, 2 threads: decode at batch 16
+15-25% tokens/s, batch 1 unchanged (docs/PERFORMANCE.md).

The tree is a copy: holding it beside the training parameters costs the projection kernels'
memory once more. :class:`gorilla_jax.generate.Generator` uses it on CPU without a multi-device
mesh (:func:`decode_layout_default`); on TPU and GPU, XLA chooses matmul layouts itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gorilla_jax.config import ModelConfig


def decode_layout_default(mesh=None) -> bool:
    """Whether generation uses the decode layout by default: on CPU, with no mesh or a mesh of
    one device (the layout has no sharding rules)."""
    return jax.default_backend() == "cpu" and (mesh is None or mesh.devices.size == 1)


def _transpose_projections(layers: dict, head, hidden: int):
    """{layer name: {self_attn, mlp}} in the decode layout, and the transposed head (or None)."""
    out = {}
    for name, layer in layers.items():
        attn, mlp = layer["self_attn"], layer["mlp"]
        qkv = [attn[n]["kernel"].reshape(hidden, -1) for n in ("q_proj", "k_proj", "v_proj")]
        out[name] = {
            "self_attn": {"qkv_t": jnp.concatenate(qkv, axis=1).T,
                          "o_t": attn["o_proj"]["kernel"].reshape(-1, hidden).T},
            "mlp": {"gate_up_t": jnp.concatenate([mlp["gate_proj"]["kernel"],
                                                  mlp["up_proj"]["kernel"]], axis=1).T,
                    "down_t": mlp["down_proj"]["kernel"].T}}
    return out, (None if head is None else head.T)


def to_decode_layout(params: dict, config: ModelConfig) -> dict:
    """The decode-layout copy of unscanned ``params`` (see the module docstring); ``params``
    itself is left as it is. Norm scales and the embedding are shared, not copied."""
    if "layers" in params:
        raise ValueError("to_decode_layout needs unscanned params (layers_0, layers_1, ...); "
                         "call unstack_layers first")
    names = [f"layers_{i}" for i in range(config.num_hidden_layers)]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"to_decode_layout: params lack {', '.join(missing)}")
    if "lm_head_t" in params or "qkv_t" in params[names[0]].get("self_attn", {}):
        raise ValueError("to_decode_layout: params are in the decode layout already")
    projections = {n: {"self_attn": params[n]["self_attn"], "mlp": params[n]["mlp"]}
                   for n in names}
    head = params["lm_head"]["kernel"] if "lm_head" in params else None
    layers, head_t = jax.jit(_transpose_projections, static_argnums=2)(
        projections, head, config.hidden_size)
    out = {k: v for k, v in params.items() if k != "lm_head"}
    for n in names:
        out[n] = {**params[n], **layers[n]}
    if head_t is not None:
        out["lm_head_t"] = head_t
    return out
