"""The Flax LLaMA against transformers' PyTorch LlamaForCausalLM, and its own invariants."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gorilla_jax.config import ModelConfig, RopeScaling
from gorilla_jax.errors import GorillaError
from gorilla_jax.model import (LlamaForCausalLM, abstract_params, hf_name_to_path, hf_tensor_shapes,
                               hf_to_params, init_params, param_logical_axes, params_to_hf,
                               stack_layers, unstack_layers, convert_hf_tensor)

torch.manual_seed(0)


def hf_llama(cfg: ModelConfig, seed: int = 0):
    """A transformers LlamaForCausalLM with random weights (norm scales too) + its numpy state."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": rs.type, "rope_theta": cfg.rope_theta, "factor": rs.factor}
        if rs.type == "llama3":
            rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                        original_max_position_embeddings=rs.original_max_position_embeddings)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.resolved_head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in hf_tensor_shapes(cfg).items():
        if "norm" in name:
            state[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            state[name] = (0.15 * rng.standard_normal(shape)).astype(np.float32)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                                strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model, state


def forward(cfg, params, ids, **kw):
    """Jitted forward pass (eager op-by-op dispatch is slow to compile for every shape)."""
    fn = jax.jit(lambda p, i, kw: LlamaForCausalLM(cfg).apply({"params": p}, i, **kw))
    return np.asarray(fn(params, jnp.asarray(ids), {k: jnp.asarray(v) for k, v in kw.items()}))


def hf_logits(model, ids, positions=None, attention_mask=None):
    with torch.no_grad():
        kw = {}
        if positions is not None:
            kw["position_ids"] = torch.from_numpy(np.array(positions, np.int64))
        if attention_mask is not None:
            kw["attention_mask"] = torch.from_numpy(np.asarray(attention_mask, np.int64))
        return model(torch.from_numpy(np.asarray(ids, np.int64)), **kw).logits.numpy()


def tiny(**kw):
    base = dict(vocab_size=101, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-6,
                max_position_embeddings=256)
    base.update(kw)
    return ModelConfig(**base)


PARITY_CONFIGS = {
    "multihead": tiny(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, vocab_size=64,
                      intermediate_size=64),
    "gqa_6q_2kv_odd_sizes": tiny(),
    "llama3_scaling": tiny(rope_theta=500000.0, rope_scaling=RopeScaling(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "linear_scaling": tiny(rope_scaling=RopeScaling(type="linear", factor=4.0)),
    "tied": tiny(tie_word_embeddings=True, num_hidden_layers=3),
    "explicit_head_dim": tiny(head_dim=16, num_attention_heads=4, num_key_value_heads=1),
}


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_match_transformers(name):
    cfg = PARITY_CONFIGS[name]
    model, state = hf_llama(cfg)
    params = jax.tree.map(jnp.asarray, hf_to_params(state, cfg))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, (2, 24))
    # Positions past the llama3 "original" context exercise all three frequency bands.
    positions = np.broadcast_to(np.arange(24) + 40, (2, 24))
    ours = forward(cfg, params, ids, positions=positions)
    ref = hf_logits(model, ids, positions)
    assert ours.shape == ref.shape == (2, 24, cfg.vocab_size)
    assert np.abs(ref).max() > 1.0  # random weights large enough for the comparison to mean something
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_padding_mask_matches_transformers():
    cfg = PARITY_CONFIGS["gqa_6q_2kv_odd_sizes"]
    model, state = hf_llama(cfg, seed=3)
    params = jax.tree.map(jnp.asarray, hf_to_params(state, cfg))
    rng = np.random.default_rng(2)
    ids = rng.integers(0, cfg.vocab_size, (3, 12))
    mask = np.ones((3, 12), np.int32)
    mask[1, :5] = 0  # left padding
    mask[2, :2] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = forward(cfg, params, ids, positions=positions, attention_mask=mask)
    ref = hf_logits(model, ids, positions, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    # A left-padded row equals the same tokens without padding.
    alone = forward(cfg, params, ids[1:2, 5:])
    np.testing.assert_allclose(ours[1, 5:], alone[0], atol=1e-5, rtol=0)
    assert np.isfinite(ours).all()


def test_hf_round_trip_and_errors():
    cfg = PARITY_CONFIGS["tied"]
    _, state = hf_llama(cfg)
    params = hf_to_params(state, cfg)
    assert "lm_head" not in params
    assert params["layers_2"]["self_attn"]["q_proj"]["kernel"].shape == (48, 6, 8)
    back = params_to_hf(params, cfg)
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
    # scanned params convert the same way
    back_scanned = params_to_hf(stack_layers(params, 3), cfg)
    np.testing.assert_array_equal(back_scanned["model.layers.1.mlp.down_proj.weight"],
                                  state["model.layers.1.mlp.down_proj.weight"])
    # tensor by tensor
    path, fn = hf_name_to_path("model.layers.1.self_attn.o_proj.weight", cfg)
    assert path == ("layers_1", "self_attn", "o_proj", "kernel")
    np.testing.assert_array_equal(fn(state["model.layers.1.self_attn.o_proj.weight"]),
                                  params["layers_1"]["self_attn"]["o_proj"]["kernel"])
    assert hf_name_to_path("model.layers.0.self_attn.rotary_emb.inv_freq", cfg) is None
    assert hf_name_to_path("lm_head.weight", cfg) is None  # tied: skipped
    with pytest.raises(GorillaError, match="model.layers.0.self_attn.q_proj.bias"):
        hf_name_to_path("model.layers.0.self_attn.q_proj.bias", cfg)
    with pytest.raises(GorillaError, match=r"model.norm.weight.*\(47,\).*\(48,\)"):
        convert_hf_tensor("model.norm.weight", np.zeros(47, np.float32), cfg, source="x.safetensors")
    with pytest.raises(GorillaError, match="layer 7 is out of range"):
        hf_name_to_path("model.layers.7.mlp.up_proj.weight", cfg)
    partial = dict(state)
    del partial["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(GorillaError, match="missing tensor.*model.layers.1.mlp.up_proj.weight"):
        hf_to_params(partial, cfg)
    # bf16 tensors keep their dtype through the transforms
    import ml_dtypes
    w = state["model.layers.0.self_attn.k_proj.weight"].astype(ml_dtypes.bfloat16)
    _, out = convert_hf_tensor("model.layers.0.self_attn.k_proj.weight", w, cfg)
    assert out.dtype == ml_dtypes.bfloat16 and out.shape == (48, 2, 8)


def test_packed_segments_equal_separate_runs():
    cfg = tiny(num_hidden_layers=2)
    params = init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x * 5.0 if x.ndim > 1 else x, params)  # livelier activations
    rng = np.random.default_rng(0)
    lens = [5, 7, 4]
    segs = [rng.integers(0, cfg.vocab_size, n) for n in lens]
    pad = 3
    ids = np.concatenate(segs + [np.zeros(pad, np.int64)])[None]
    seg_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)] + [np.zeros(pad)])[None]
    pos = np.concatenate([np.arange(n) for n in lens] + [np.arange(pad)])[None]
    packed = forward(cfg, params, ids, positions=pos, segment_ids=seg_ids.astype(np.int32))
    start = 0
    for s in segs:
        alone = forward(cfg, params, s[None])
        np.testing.assert_allclose(packed[0, start:start + len(s)], alone[0], atol=1e-5, rtol=0)
        start += len(s)
    # Without segment ids the second segment would see the first: the outputs differ.
    unpacked = forward(cfg, params, ids, positions=pos)
    assert np.abs(unpacked[0, 5:12] - packed[0, 5:12]).max() > 1e-2


def _loss_and_grad(cfg, ids):
    def loss(p):
        logits = LlamaForCausalLM(cfg).apply({"params": p}, ids)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def plain_reference():
    cfg = tiny(num_hidden_layers=3)
    params = init_params(cfg, jax.random.PRNGKey(1))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
    (_, logits), grads = _loss_and_grad(cfg, ids)(params)
    return cfg, params, ids, logits, grads


@pytest.mark.parametrize("scan,remat", [(False, "full"), (False, "dots"), (True, "none"),
                                        (True, "dots_no_batch")])
def test_scan_and_remat_same_logits_and_grads(plain_reference, scan, remat):
    base, params, ids, ref_logits, ref_grads = plain_reference
    cfg = dataclasses.replace(base, scan_layers=scan, remat=remat)
    p2 = stack_layers(params, 3) if scan else params
    (_, logits2), g2 = _loss_and_grad(cfg, ids)(p2)
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(ref_logits), atol=1e-5, rtol=0)
    if scan:
        assert g2["layers"]["mlp"]["up_proj"]["kernel"].shape == (3, 48, 100)
        g2 = unstack_layers(g2, 3)
    assert jax.tree.structure(ref_grads) == jax.tree.structure(g2)
    for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-4)


def test_scanned_init_layout_and_logical_axes():
    cfg = tiny(num_hidden_layers=3, scan_layers=True, tie_word_embeddings=True)
    shapes = abstract_params(cfg)
    axes = param_logical_axes(cfg)
    assert set(shapes) == {"embed_tokens", "layers", "norm"}
    assert shapes["layers"]["self_attn"]["k_proj"]["kernel"].shape == (3, 48, 2, 8)
    assert axes["layers"]["self_attn"]["k_proj"]["kernel"] == ("layers", "embed", "kv_heads", "head_dim")
    assert axes["embed_tokens"]["embedding"] == ("vocab", "embed")
    # every parameter is named, one name per dimension
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    for a, s in zip(flat_axes, jax.tree.leaves(shapes)):
        assert len(a) == len(s.shape) and all(isinstance(n, str) for n in a)
    unscanned = unstack_layers(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes), 3)
    assert unscanned["layers_2"]["mlp"]["down_proj"]["kernel"].shape == (100, 48)
    assert jax.tree.map(lambda x: x.shape, stack_layers(unscanned, 3)) == \
        jax.tree.map(lambda x: x.shape, shapes)


def test_bf16_compute_close_to_fp32():
    cfg = tiny()
    params = init_params(cfg, jax.random.PRNGKey(2))
    params = jax.tree.map(lambda x: x * 5.0 if x.ndim > 1 else x, params)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)))
    ref = forward(cfg, params, ids)
    bf = forward(dataclasses.replace(cfg, dtype="bfloat16"), params, ids)
    assert bf.dtype == np.float32
    err = np.abs(np.asarray(bf) - ref).max()
    assert 0 < err < 0.05 * np.abs(ref).max()
    # bf16 parameters too
    cfg_bf = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    p_bf = init_params(cfg_bf, jax.random.PRNGKey(2))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p_bf))
    out = forward(cfg_bf, p_bf, ids)
    assert np.isfinite(np.asarray(out)).all()


def test_last_only_matches_full():
    cfg = tiny()
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 7)))
    full = forward(cfg, params, ids)
    last = jax.jit(lambda p, i: LlamaForCausalLM(cfg).apply({"params": p}, i, last_only=True))(params, ids)
    assert last.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), atol=1e-6)


@pytest.fixture(scope="module")
def packed_padded_batch():
    """128 tokens per row (splash needs multiples of 128): two segments, row 1 left-padded."""
    cfg = tiny(num_hidden_layers=1)
    params = init_params(cfg, jax.random.PRNGKey(4))
    params = jax.tree.map(lambda x: x * 5.0 if x.ndim > 1 else x, params)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, cfg.vocab_size, (2, 128))
    seg = np.concatenate([np.ones((2, 50)), 2 * np.ones((2, 78))], 1).astype(np.int32)
    pos = np.tile(np.concatenate([np.arange(50), np.arange(78)]), (2, 1))
    mask = (np.arange(128)[None] >= np.array([[0], [7]])).astype(np.int32)
    return cfg, params, ids, dict(positions=pos, segment_ids=seg, attention_mask=mask)


@pytest.mark.parametrize("kernel", ["cudnn", "splash"])
def test_attention_kernels_match_xla(packed_padded_batch, kernel):
    cfg, params, ids, batch = packed_padded_batch
    kw = {k: jnp.asarray(v) for k, v in batch.items()}
    real = batch["attention_mask"].astype(bool)
    kcfg = dataclasses.replace(cfg, attention=kernel)

    def loss_fn(c):
        def loss(p):
            logits = LlamaForCausalLM(c).apply({"params": p}, jnp.asarray(ids), **kw)
            return jnp.sum(logits * jnp.asarray(real)[..., None] * 1e-3), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (_, ref), ref_g = loss_fn(cfg)(params)
    (_, got), got_g = loss_fn(kcfg)(params)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=2e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(got_g)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("one_stream", [True, False])
def test_init_params_statistics(one_stream):
    cfg = tiny(initializer_range=0.05, param_dtype="bfloat16")
    params = init_params(cfg, jax.random.PRNGKey(0), one_stream=one_stream)
    shapes = abstract_params(cfg)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), shapes)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    np.testing.assert_array_equal(np.asarray(params["norm"]["scale"], np.float32), 1.0)
    w = np.asarray(params["layers_1"]["mlp"]["gate_proj"]["kernel"], np.float32)
    assert abs(w.std() - 0.05) < 0.005 and abs(w.mean()) < 0.005
    q0 = np.asarray(params["layers_0"]["self_attn"]["q_proj"]["kernel"], np.float32)
    q1 = np.asarray(params["layers_1"]["self_attn"]["q_proj"]["kernel"], np.float32)
    assert not np.array_equal(q0, q1)  # layers are drawn independently
    again = init_params(cfg, jax.random.PRNGKey(0), one_stream=one_stream)
    np.testing.assert_array_equal(np.asarray(again["lm_head"]["kernel"], np.float32),
                                  np.asarray(params["lm_head"]["kernel"], np.float32))


@pytest.mark.parametrize("blocks", [1, 3, 5])  # 5 blocks of 12 queries: 2, 2, 3, 2, 3
def test_grouped_attention_backward_equals_autodiff_of_the_einsum_form(blocks):
    # dot_product_attention has a hand-written backward; autodiff of the cache path's einsum
    # form (_gqa_attention) is the reference, with packing and fully masked (padding) rows.
    # With causal query blocks a fully masked row is uniform over its block's keys only (its
    # output is meaningless): it is left out of the compared sum, and checked on its own.
    from gorilla_jax.model import attention as A
    rng = np.random.default_rng(1)
    B, S, H, KV, Dh = 2, 12, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((B, S, H, Dh), (B, S, KV, Dh), (B, S, KV, Dh)))
    seg = np.ones((B, S), np.int32)
    seg[1, S // 2:] = 2
    pad = np.ones((B, S), np.int32)
    pad[0, :3] = 0
    mask = A.build_mask(S, jnp.asarray(seg), jnp.asarray(pad))
    w = rng.standard_normal((B, S, H, Dh))
    if blocks > 1:
        w[0, :3] = 0.0  # the fully masked rows
    w = jnp.asarray(w, jnp.float32)
    new = jax.jit(jax.value_and_grad(
        lambda *a: jnp.sum(A.dot_product_attention(*a, mask, jnp.float32, blocks) * w), (0, 1, 2)))
    ref = jax.value_and_grad(
        lambda *a: jnp.sum(A._gqa_attention(*a, mask, jnp.float32, "btnd", "btnd") * w), (0, 1, 2))
    (got, got_g), (want, want_g) = new(q, k, v), ref(q, k, v)
    # a float32 sum of 768 terms of order 1 that cancel to about 3: its last digits follow the
    # summation order, which differs between CPUs (1.7e-6 relative on a Zen 4, AVX-512 machine)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g_, w_ in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g_), np.asarray(w_), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(want_g[0]).max()) > 0.1
    out = np.asarray(A.dot_product_attention(q, k, v, mask, jnp.float32, blocks))
    ends = [S * (i + 1) // blocks for i in range(blocks)]  # blocks of consecutive queries
    for row in range(3):  # uniform over the keys up to the end of the row's block
        end = min(e for e in ends if e > row)
        uniform = np.repeat(np.asarray(v)[0, :end].mean(0), H // KV, axis=0)  # [H, Dh]
        np.testing.assert_allclose(out[0, row], uniform, atol=1e-6)


@pytest.mark.parametrize("parts,mask_batch", [(2, 5), (3, 5), (5, 1)])
def test_attention_batch_parts_equal_the_whole_batch(parts, mask_batch):
    # the batch cut into parts of consecutive rows (3 parts of 5 rows: 1, 2, 2), with a
    # per-row mask (packing and padding) or one causal mask broadcast over the batch
    from gorilla_jax.model import attention as A
    rng = np.random.default_rng(2)
    B, S, H, KV, Dh = 5, 40, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((B, S, H, Dh), (B, S, KV, Dh), (B, S, KV, Dh)))
    if mask_batch == 1:
        mask = A.build_mask(S)
    else:
        seg = np.ones((B, S), np.int32)
        seg[1, S // 2:] = 2
        pad = np.ones((B, S), np.int32)
        pad[3, :5] = 0
        mask = A.build_mask(S, jnp.asarray(seg), jnp.asarray(pad))
    assert mask.shape[0] == mask_batch
    w = jnp.asarray(rng.standard_normal((B, S, H, Dh)), jnp.float32)

    def loss(n):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(
            A.dot_product_attention(*a, mask, jnp.float32, 2, n) * w), (0, 1, 2)))

    (whole, whole_g), (cut, cut_g) = loss(1)(q, k, v), loss(parts)(q, k, v)
    np.testing.assert_allclose(float(cut), float(whole), rtol=1e-6)
    for a, b in zip(cut_g, whole_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(A.dot_product_attention(q, k, v, mask, jnp.float32, 2, parts)),
        np.asarray(A.dot_product_attention(q, k, v, mask, jnp.float32, 2)), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(whole_g[1]).max()) > 0.1
    # each part is its own core: two causal blocks of two products per part
    jaxpr = str(jax.make_jaxpr(lambda *a: A.dot_product_attention(*a, mask, jnp.float32, 2,
                                                                 parts))(q, k, v))
    assert jaxpr.count("dot_general") == 4 * parts


def test_attention_batch_parts_only_for_a_batch_on_one_device():
    from gorilla_jax.config import MeshConfig
    from gorilla_jax.model.attention import CPU_BATCH_PARTS, attention_batch_parts
    from gorilla_jax.sharding import activate, make_mesh

    assert jax.default_backend() == "cpu" and CPU_BATCH_PARTS == 2
    assert attention_batch_parts(8) == 2 and attention_batch_parts(1) == 1
    with activate(make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))):
        assert attention_batch_parts(8) == 1  # the batch is split over the data axis
    with activate(make_mesh(MeshConfig(data=1, fsdp=1, tensor=-1))):
        assert attention_batch_parts(8) == 2  # heads split, the batch whole on every device
    # `tpu fit` compiles from this CPU host for TPU devices: their platform decides
    from gorilla_jax.tpu.chips import parse_topology
    from gorilla_jax.tpu.fit import topology_devices
    tpus = topology_devices(parse_topology("v5e:2x2"))
    with activate(make_mesh(MeshConfig(data=1, fsdp=1, tensor=-1), devices=tpus)):
        assert attention_batch_parts(8) == 1


@pytest.mark.parametrize("seq_len,blocks", [(8, 1), (63, 1), (64, 2), (100, 3), (128, 4),
                                            (4096, 4)])
def test_causal_query_blocks(seq_len, blocks):
    from gorilla_jax.model.attention import causal_query_blocks
    assert causal_query_blocks(seq_len) == blocks


def test_causal_query_blocks_match_transformers():
    # 100 positions: three query blocks of uneven length (33, 33, 34), one row left-padded
    # over the first block and into the second (compared where real)
    cfg = PARITY_CONFIGS["gqa_6q_2kv_odd_sizes"]
    model, state = hf_llama(cfg, seed=4)
    params = jax.tree.map(jnp.asarray, hf_to_params(state, cfg))
    rng = np.random.default_rng(3)
    S = 100
    ids = rng.integers(0, cfg.vocab_size, (2, S))
    mask = np.ones((2, S), np.int32)
    mask[1, :40] = 0  # the padding covers the first block and part of the second
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours = forward(cfg, params, ids, positions=positions, attention_mask=mask)
    ref = hf_logits(model, ids, positions, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1.0 and np.isfinite(ours).all()


@pytest.mark.parametrize("rows", [(2, 12), (3, 40)])  # 24 rows: fused gate/up; 120: separate
def test_swiglu_backward_equals_autodiff_of_the_plain_form(rows):
    from gorilla_jax.model.layers import swiglu
    rng = np.random.default_rng(2)
    D, F = 16, 24
    x, wg, wu, wd, w = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                        for s in (rows + (D,), (D, F), (D, F), (F, D), rows + (D,)))

    def plain(x, wg, wu, wd):
        return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd

    new = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(swiglu(*a) * w), (0, 1, 2, 3)))
    ref = jax.value_and_grad(lambda *a: jnp.sum(plain(*a) * w), (0, 1, 2, 3))
    (got, got_g), (want, want_g) = new(x, wg, wu, wd), ref(x, wg, wu, wd)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g_, w_ in zip(got_g, want_g):
        assert g_.shape == w_.shape
        np.testing.assert_allclose(np.asarray(g_), np.asarray(w_), rtol=1e-4, atol=1e-4)
        assert float(jnp.abs(w_).max()) > 1.0


def test_swiglu_backward_transposes_no_activation():
    # d_wd is computed as (dy^T h)^T: h ([rows, F]) is read in its own order by the product.
    # Written as h^T dy, XLA:CPU fused h's elementwise computation into h's transpose, a loop
    # that reads its inputs with the transpose's stride (~15 ms per layer on the 19M benchmark
    # step on a Zen 1 CPU). No [F, rows] array may appear in the compiled gradient.
    if jax.default_backend() != "cpu":
        pytest.skip("the compiled program checked here is XLA:CPU's")
    from gorilla_jax.model.layers import swiglu
    B, S, D, F = 3, 40, 16, 24
    x = jnp.ones((B, S, D), jnp.float32)
    wg, wu, wd = jnp.ones((D, F)), jnp.ones((D, F)), jnp.ones((F, D))
    hlo = jax.jit(jax.grad(lambda *a: jnp.sum(swiglu(*a)), (0, 1, 2, 3))).lower(
        x, wg, wu, wd).compile().as_text()
    assert f"f32[{D},{B * S}]" in hlo or f"f32[{D},{B},{S}]" in hlo  # dy^T and x^T are made
    for shape in (f"f32[{F},{B * S}]", f"f32[{F},{B},{S}]"):
        assert shape not in hlo, shape
    # and every product is a fast one: none is left to XLA's generic dot in the entry
    # computation (the [D, F] result's transpose, folded into its product, made one)
    entry = hlo[hlo.index("\nENTRY"):]
    assert " dot(" not in entry, [l for l in entry.splitlines() if " dot(" in l]


@pytest.mark.parametrize("block", ["swiglu", "attention"])
def test_backward_only_values_wait_for_the_backward(block, monkeypatch):
    # layers.computed_after gives the hand-written backward passes' residuals a data dependency
    # on the incoming cotangent; without it XLA:CPU computes the SwiGLU activations, their
    # transposes and the attention probabilities' transpose during the forward pass and keeps
    # them alive through the following layers: more temporaries for the same gradients.
    if jax.default_backend() != "cpu":
        pytest.skip("the schedule checked here is XLA:CPU's")
    from gorilla_jax.model import attention, layers
    rng = np.random.default_rng(4)
    B, S, D, F, H, KV, L = 4, 64, 64, 256, 4, 2, 4
    Dh = D // H
    mask = attention.build_mask(S)
    if block == "swiglu":
        ws = [tuple(jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32)
                    for s in ((D, F), (D, F), (F, D))) for _ in range(L)]

        def f(x, ws):
            for wg, wu, wd in ws:
                x = x + layers.swiglu(x, wg, wu, wd)
            return jnp.sum(jnp.sin(x))
    else:
        ws = [jnp.asarray(rng.standard_normal((D, D)) * 0.1, jnp.float32) for _ in range(L)]

        def f(x, ws):
            for w in ws:
                q = (x @ w).reshape(B, S, H, Dh)
                kv = x.reshape(B, S, H, Dh)[:, :, :KV]
                x = x + attention.dot_product_attention(q, kv, kv, mask, jnp.float32).reshape(B, S, D)
            return jnp.sum(jnp.sin(x))

    x = jnp.asarray(rng.standard_normal((B, S, D)), jnp.float32)

    def temp_and_grads():
        grad = jax.jit(jax.grad(f, (0, 1)))
        temp = grad.lower(x, ws).compile().memory_analysis().temp_size_in_bytes
        return temp, jax.tree.leaves(grad(x, ws))

    temp, grads = temp_and_grads()
    monkeypatch.setattr(layers, "computed_after", lambda x, dependency: x)
    monkeypatch.setattr(attention, "computed_after", lambda x, dependency: x)
    temp_early, grads_early = temp_and_grads()
    for g, g_early in zip(grads, grads_early):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_early), rtol=1e-5, atol=1e-6)
    assert temp < 0.85 * temp_early, (temp, temp_early)


@pytest.mark.parametrize("name", ["gqa_6q_2kv_odd_sizes", "llama3_scaling"])
def test_rope_cos_sin_computed_once_per_angle(name):
    # rope_cos_sin spreads each angle's cos and sin to both halves of head_dim with a product;
    # the values are exactly those of the elementwise form, and in the compiled gradient cos
    # and sin each appear in one computation, not in every layer's q and k rotations.
    from gorilla_jax.model.layers import rope_cos_sin, rope_inv_freq
    cfg = PARITY_CONFIGS[name]
    positions = jnp.asarray(np.random.default_rng(5).integers(0, 5000, (3, 7)), jnp.int32)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jax.jit(lambda p: rope_cos_sin(cfg, p))(positions)
    np.testing.assert_array_equal(np.asarray(cos), np.asarray(jax.jit(jnp.cos)(angles)))
    np.testing.assert_array_equal(np.asarray(sin), np.asarray(jax.jit(jnp.sin)(angles)))
    if jax.default_backend() != "cpu":
        return  # the fusion checked below is XLA:CPU's
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.zeros((2, 9), jnp.int32)
    hlo = _loss_and_grad(cfg, ids).lower(params).compile().as_text()
    computations = hlo.split("\n\n")
    assert sum(" cosine(" in c for c in computations) == 1
    assert sum(" sine(" in c for c in computations) == 1
