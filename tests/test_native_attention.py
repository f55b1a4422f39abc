"""The native causal attention kernels (gorilla_jax/cpu_kernels/attention.cc): values and
gradients against a JAX reference, masks, when the model uses them, and bad shapes."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from gorilla_jax import cpu_kernels, sharding
from gorilla_jax.cpu_kernels import attention as native
from gorilla_jax.model import LlamaForCausalLM, init_params
from gorilla_jax.model.attention import _MASK_VALUE, build_mask
from gorilla_jax.model.layers import apply_rope
from test_cpu_kernels import one_cpu  # noqa: F401 (the fixture: a one-device mesh)
from test_train_step import TINY


def reference(q, k, v, mask, cos, sin, scale):
    """The kernels' definition in plain JAX: the rotary embedding on q and k, keys after the
    query excluded, masked keys at the mask value (so a row without keys is uniform over keys
    0 .. its position)."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    B, S, H, Dh = q.shape
    G = H // k.shape[2]
    kk, vv = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bshd,bthd->bhst", q, kk) * scale
    s = jnp.where(mask[:, None], s, _MASK_VALUE)
    s = jnp.where(jnp.tril(jnp.ones((S, S), bool)), s, -jnp.inf)
    return jnp.einsum("bhst,bthd->bshd", jax.nn.softmax(s, axis=-1), vv)


def _inputs(B, S, H, KV, Dh, seed=0):
    """q, k, v, a cotangent for the output, and cos, sin of random angles."""
    rng = np.random.default_rng(seed)
    q, k, v, ct = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
                   ((B, S, H, Dh), (B, S, KV, Dh), (B, S, KV, Dh), (B, S, H, Dh)))
    angles = rng.uniform(-np.pi, np.pi, size=(B, S, Dh))
    return q, k, v, ct, jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles),
                                                                              jnp.float32)


def _value_and_grads(fn, q, k, v, ct):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct),
                                      argnums=(0, 1, 2)))(q, k, v)


# head groups of 1, 2 and 3; several row blocks with tails; head dims of 16, 32 and 64
@pytest.mark.parametrize("B,S,H,KV,Dh,masking", [
    (2, 40, 4, 4, 16, "causal"),
    (2, 37, 6, 2, 32, "segments"),
    (3, 70, 6, 3, 32, "segments"),
    (1, 65, 4, 1, 64, "causal"),
    (2, 128, 8, 4, 32, "segments"),
])
def test_matches_the_reference_forward_and_backward(one_cpu, B, S, H, KV, Dh, masking):
    q, k, v, ct, cos, sin = _inputs(B, S, H, KV, Dh)
    if masking == "segments":  # packed examples: attention stays within each segment
        seg = np.sort(np.random.default_rng(1).integers(1, 4, size=(B, S)), axis=1)
        mask = build_mask(S, jnp.asarray(seg, jnp.int32))
    else:
        mask = build_mask(S)
    scale = Dh ** -0.5
    out = jax.jit(native.causal_attention, static_argnums=6)(q, k, v, mask, cos, sin, scale)
    np.testing.assert_allclose(out, reference(q, k, v, mask, cos, sin, scale), atol=2e-6,
                               rtol=1e-5)
    val, grads = _value_and_grads(
        lambda q, k, v: native.causal_attention(q, k, v, mask, cos, sin, scale), q, k, v, ct)
    ref_val, ref_grads = _value_and_grads(
        lambda q, k, v: reference(q, k, v, mask, cos, sin, scale), q, k, v, ct)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert float(jnp.max(jnp.abs(r))) > 0.1
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4)


def test_rows_without_keys_are_uniform_and_pass_no_gradient_to_q_and_k(one_cpu):
    B, S, H, KV, Dh = 2, 36, 4, 2, 16
    q, k, v, ct, cos, sin = _inputs(B, S, H, KV, Dh, seed=3)
    valid = np.ones((B, S), bool)
    valid[0, :5] = False  # left padding: queries 0..4 of row 0 have no key to attend
    mask = build_mask(S, attention_mask=jnp.asarray(valid))
    out = native.causal_attention(q, k, v, mask, cos, sin, 0.25)
    vv = np.repeat(np.asarray(v), H // KV, axis=2)
    for i in range(5):  # uniform over keys 0..i
        np.testing.assert_allclose(out[0, i], vv[0, :i + 1].mean(axis=0), atol=1e-6)
    _, (dq, dk, dv) = _value_and_grads(
        lambda q, k, v: native.causal_attention(q, k, v, mask, cos, sin, 0.25), q, k, v, ct)
    _, (rq, rk, rv) = _value_and_grads(
        lambda q, k, v: reference(q, k, v, mask, cos, sin, 0.25), q, k, v, ct)
    assert np.all(np.asarray(dq)[0, :5] == 0)
    for g, r in ((dq, rq), (dk, rk), (dv, rv)):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4)


def test_applies_to_float32_on_one_cpu_device_with_head_dims_of_16s(one_cpu, monkeypatch):
    q, k, _, _, cos, _ = _inputs(1, 8, 4, 2, 16)
    assert native.applies(q, k, jnp.float32, cos)
    assert not native.applies(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), jnp.bfloat16, cos)
    assert not native.applies(q[..., :8], k[..., :8], jnp.float32, cos[..., :8])  # head dim 8
    assert not native.applies(q, k[:, :4], jnp.float32, cos)  # fewer keys than queries
    assert not native.applies(q, k, jnp.float32, cos[:1, :1])  # angles not per (row, position)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not native.applies(q, k, jnp.float32, cos)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    with sharding.activate(Mesh(np.array(jax.devices()), ("data",))):
        assert not native.applies(q, k, jnp.float32, cos)  # 8 devices: XLA's partitioned code


def test_model_with_the_kernels_matches_the_xla_attention(one_cpu, monkeypatch):
    cfg = dataclasses.replace(TINY, hidden_size=64)  # 4 heads of 16
    model = LlamaForCausalLM(cfg)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 48)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1] * 30 + [2] * 18], 2, axis=0), jnp.int32)

    def run(kernels: bool):
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1" if kernels else "0")

        def loss(p):
            logits = model.apply({"params": p}, ids, segment_ids=segments)
            return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

        fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        hlo = fn.lower(params).as_text()
        (_, logits), grads = fn(params)
        return logits, grads, hlo

    logits, grads, hlo = run(True)
    ref_logits, ref_grads, ref_hlo = run(False)
    assert hlo.count("@gorilla_attention_fwd(") == cfg.num_hidden_layers
    assert hlo.count("@gorilla_attention_bwd(") == cfg.num_hidden_layers
    assert "@gorilla_attention" not in ref_hlo
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-4)


def test_bad_shapes_get_a_clear_error(one_cpu):
    q, k, v, _, cos, sin = _inputs(1, 8, 4, 2, 8)  # head dim 8: not a multiple of 16
    with pytest.raises(Exception, match="Dh a multiple of 16"):
        jax.block_until_ready(native.causal_attention(q, k, v, build_mask(8), cos, sin, 0.3))
    q, k, v, _, cos, sin = _inputs(1, 8, 4, 2, 16)
    with pytest.raises(Exception, match=r"cos and sin \[B,S,Dh\]"):
        jax.block_until_ready(native.causal_attention(q, k, v, build_mask(8), cos[:, :4],
                                                      sin[:, :4], 0.3))
