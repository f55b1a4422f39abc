"""The decode layout: transposed, fused projection kernels give the model's own logits and tokens."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gorilla_jax.config import MeshConfig, ModelConfig
from gorilla_jax.errors import GorillaError
from gorilla_jax.generate import Generator
from gorilla_jax.model import LlamaForCausalLM, init_params, layers, stack_layers
from gorilla_jax.model.decode_layout import decode_layout_default, to_decode_layout
from gorilla_jax.sharding import make_mesh

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
PROMPTS = [[5, 9, 2, 7, 1], [3, 8], [11, 4, 6]]


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=request.param)
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


def test_kernels_are_transposed_and_fused_and_the_rest_is_shared(model):
    cfg, params = model
    out = to_decode_layout(params, cfg)
    D, H, KV, Dh, F = 32, 4, 2, 8, 48
    a, m = params["layers_1"]["self_attn"], params["layers_1"]["mlp"]
    qkv_t = np.asarray(out["layers_1"]["self_attn"]["qkv_t"])
    assert qkv_t.shape == ((H + 2 * KV) * Dh, D)
    np.testing.assert_array_equal(qkv_t[:H * Dh], np.asarray(a["q_proj"]["kernel"]).reshape(D, -1).T)
    np.testing.assert_array_equal(qkv_t[(H + KV) * Dh:], np.asarray(a["v_proj"]["kernel"]).reshape(D, -1).T)
    np.testing.assert_array_equal(out["layers_1"]["self_attn"]["o_t"],
                                  np.asarray(a["o_proj"]["kernel"]).reshape(-1, D).T)
    gate_up = np.asarray(out["layers_1"]["mlp"]["gate_up_t"])
    assert gate_up.shape == (2 * F, D)
    np.testing.assert_array_equal(gate_up[F:], np.asarray(m["up_proj"]["kernel"]).T)
    np.testing.assert_array_equal(out["layers_1"]["mlp"]["down_t"], np.asarray(m["down_proj"]["kernel"]).T)
    assert out["layers_1"]["input_layernorm"]["scale"] is params["layers_1"]["input_layernorm"]["scale"]
    assert out["embed_tokens"]["embedding"] is params["embed_tokens"]["embedding"]
    if cfg.tie_word_embeddings:
        assert "lm_head_t" not in out and "lm_head" not in params
    else:
        np.testing.assert_array_equal(out["lm_head_t"], np.asarray(params["lm_head"]["kernel"]).T)
        assert "lm_head" not in out
    # the input tree is untouched
    assert set(params["layers_1"]["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.parametrize("length", [3, 80])  # 3 rows: weight-major products; 80: x @ w^T
def test_logits_match_the_training_layout(model, length):
    cfg, params = model
    ids = jax.random.randint(jax.random.PRNGKey(1), (1, length), 0, cfg.vocab_size)
    apply = LlamaForCausalLM(cfg).apply
    want = apply({"params": params}, ids)
    got = apply({"params": to_decode_layout(params, cfg)}, ids)
    assert got.shape == (1, length, cfg.vocab_size)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


def test_weight_major_product_equals_the_plain_one(monkeypatch):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 16))
    w = jax.random.normal(jax.random.PRNGKey(1), (24, 16))
    want = np.einsum("bsk,nk->bsn", np.asarray(x), np.asarray(w))
    monkeypatch.setattr(layers, "WEIGHT_MAJOR_ROWS", 6)
    hlo = jax.jit(lambda x, w: layers.project_out_in(x, w, jnp.float32)).lower(x, w).as_text()
    assert "optimization_barrier" in hlo  # 6 rows: the weight-major form
    np.testing.assert_allclose(layers.project_out_in(x, w, jnp.float32), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(layers, "WEIGHT_MAJOR_ROWS", 5)
    hlo = jax.jit(lambda x, w: layers.project_out_in(x, w, jnp.float32)).lower(x, w).as_text()
    assert "optimization_barrier" not in hlo
    np.testing.assert_allclose(layers.project_out_in(x, w, jnp.float32), want, rtol=1e-5, atol=1e-5)


def test_generator_uses_it_on_cpu_and_generates_the_same_tokens(model):
    cfg, params = model
    plain = Generator(params, cfg, decode_layout=False)
    fast = Generator(params, cfg)
    assert fast.decode_layout and not plain.decode_layout
    assert "gate_up_t" in fast.params["layers_0"]["mlp"]
    want = plain.generate(PROMPTS, 12)
    assert fast.generate(PROMPTS, 12) == want
    assert [len(t) for t in want] == [12, 12, 12]
    # scanned params are unstacked first, then converted
    scanned = dataclasses.replace(cfg, scan_layers=True)
    gen = Generator(stack_layers(params, cfg.num_hidden_layers), scanned)
    assert gen.decode_layout and gen.generate(PROMPTS, 12) == want


def test_default_and_errors():
    params = init_params(CFG, jax.random.PRNGKey(0))
    mesh8 = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    mesh1 = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    assert decode_layout_default() and decode_layout_default(mesh1)
    assert not decode_layout_default(mesh8)
    assert not Generator(params, CFG, mesh=mesh8).decode_layout
    with pytest.raises(GorillaError, match="8 devices"):
        Generator(params, CFG, mesh=mesh8, decode_layout=True)
    with pytest.raises(ValueError, match="unstack_layers"):
        to_decode_layout(stack_layers(params, 2), CFG)
    with pytest.raises(ValueError, match="already"):
        to_decode_layout(to_decode_layout(params, CFG), CFG)
    with pytest.raises(ValueError, match="layers_1"):
        to_decode_layout({k: v for k, v in params.items() if k != "layers_1"}, CFG)
