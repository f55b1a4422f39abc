"""KV-cache forward path and batched generation (greedy vs transformers, EOS, stops, sampling)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gorilla_jax.config import ModelConfig
from gorilla_jax.errors import GorillaError
from gorilla_jax.generate import Generator, bucket, generate
from gorilla_jax.config import MeshConfig
from gorilla_jax.model import (LlamaForCausalLM, hf_tensor_shapes, hf_to_params, init_cache,
                               stack_layers)
from gorilla_jax.sharding import make_mesh

CFG = ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-6,
                  max_position_embeddings=256)


def random_state(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {name: ((1.0 + 0.2 * rng.standard_normal(shape)) if "norm" in name
                   else 0.15 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in hf_tensor_shapes(cfg).items()}


@pytest.fixture(scope="module")
def models():
    state = random_state(CFG)
    params = jax.tree.map(jnp.asarray, hf_to_params(state, CFG))
    hf_cfg = transformers.LlamaConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size,
        intermediate_size=CFG.intermediate_size, num_hidden_layers=CFG.num_hidden_layers,
        num_attention_heads=CFG.num_attention_heads, num_key_value_heads=CFG.num_key_value_heads,
        rms_norm_eps=CFG.rms_norm_eps, max_position_embeddings=CFG.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": CFG.rope_theta},
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return params, hf, Generator(params, CFG, pad_id=0)


PROMPTS = [[1, 17, 33, 5, 90], [1, 64], [1, 8, 8, 42, 77, 3, 11, 19, 23, 50, 61]]


@pytest.mark.parametrize("scan", [False, True])
def test_cache_path_equals_full_forward(models, scan):
    params, _, _ = models
    cfg = dataclasses.replace(CFG, scan_layers=scan)
    if scan:
        params = stack_layers(params, cfg.num_hidden_layers)
    model = LlamaForCausalLM(cfg)
    ids = np.array([[0, 0, 0, 1, 17, 33, 5, 90, 44, 12], [1, 8, 8, 42, 77, 3, 11, 19, 23, 50]])
    mask = (np.arange(10)[None] >= np.array([[3], [0]])).astype(np.int32)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    full = jax.jit(lambda p: model.apply({"params": p}, ids, positions=pos, attention_mask=mask))(params)

    step = jax.jit(lambda p, i, ps, m, c: model.apply({"params": p}, i, positions=ps,
                                                       attention_mask=m, cache=c))
    cache = init_cache(cfg, 2, 16)
    logits, cache = step(params, ids[:, :6], pos[:, :6], mask[:, :6], cache)  # prefill
    got = [logits]
    for t in range(6, 10):  # then one token at a time
        logits, cache = step(params, ids[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1], cache)
        got.append(logits)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    real = mask.astype(bool)
    assert int(cache["index"]) == 10 and len(cache["k"]) == cfg.num_hidden_layers
    assert cache["k"][1].shape == (2, cfg.num_key_value_heads, 16, cfg.resolved_head_dim)
    assert cache["v"][1].shape == (2, cfg.num_key_value_heads, cfg.resolved_head_dim, 16)
    np.testing.assert_array_equal(np.asarray(cache["mask"])[:, :10], real)
    assert not np.asarray(cache["mask"])[:, 10:].any()
    np.testing.assert_allclose(got[real], np.asarray(full)[real], atol=1e-5, rtol=0)


def test_greedy_equals_transformers_generate(models):
    params, hf, gen = models
    ours = gen.generate(PROMPTS, 12)
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()
    # transformers' own left-padded batch agrees too
    P = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in PROMPTS])
    am = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=am, max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert ours == ref[:, P:].tolist()


def test_batched_equals_one_by_one_and_compiles_once_per_bucket(models):
    params, _, _ = models
    gen = Generator(params, CFG, pad_id=0)
    batched = gen.generate(PROMPTS, 20)
    alone = [gen.generate([p], 20)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(x) == 20 for x in batched)
    # prompts of other lengths in the same buckets reuse the compiled functions
    gen.generate([[1, 2, 3, 4, 5, 6, 7]], 9)
    gen.generate([[1, 9]], 15)
    gen.generate([[1, 9, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]], 16)
    assert sorted(gen.compiled_shapes) == [(1, 16, 16, "greedy"), (1, 16, 32, "greedy"),
                                           (4, 16, 32, "greedy")]
    prefill, decode, _ = gen._fns[(1, 16, 16, "greedy")]
    assert prefill._cache_size() == 1 and decode._cache_size() == 1


@pytest.mark.parametrize("windows", [2, 4])
def test_growing_cache_generates_what_the_full_cache_does(models, windows):
    """The cache grown in windows (one decode compile per size) decodes the same tokens as the
    whole cache allocated up front: greedy, sampled, with EOS and with stop-string chunks that
    do not line up with the windows."""
    params, _, _ = models
    full = Generator(params, CFG, pad_id=0, cache_windows=1)
    grown = Generator(params, CFG, pad_id=0, cache_windows=windows)
    assert full._window(64) == 64 and grown._window(64) == 64 // windows
    assert grown._window(16) == 16  # windows are whole multiples of 16 slots
    greedy = full.generate(PROMPTS, 40)
    assert grown.generate(PROMPTS, 40) == greedy
    _, decode, _ = grown._fns[(4, 16, 64, "greedy")]
    assert decode._cache_size() == min(windows, 3)  # 40 tokens need 3 of 4 windows of 16
    sampled = full.generate(PROMPTS, 40, temperature=0.9, top_p=0.95, seed=11)
    assert grown.generate(PROMPTS, 40, temperature=0.9, top_p=0.95, seed=11) == sampled
    assert sampled != greedy
    eos = greedy[0][20]
    assert grown.generate(PROMPTS, 40, eos_ids=[eos]) == full.generate(PROMPTS, 40, eos_ids=[eos])
    decode_fn = lambda toks: " ".join(f"t{t}" for t in toks)  # noqa: E731
    stop = f"t{greedy[2][25]}"
    kw = dict(stop_strings=[stop], decode_fn=decode_fn, stop_check_every=7)
    cut = full.generate(PROMPTS, 40, **kw)
    assert grown.generate(PROMPTS, 40, **kw) == cut and len(cut[2]) <= 26
    with pytest.raises(GorillaError, match="cache_windows must be >= 1"):
        Generator(params, CFG, cache_windows=0)


def test_stops_at_eos_per_sequence(models):
    params, _, gen = models
    free = gen.generate(PROMPTS, 16)
    eos = free[0][4]  # a token the first sequence emits at step 5
    first_hits = [row.index(eos) if eos in row else None for row in free]
    stopped = gen.generate(PROMPTS, 16, eos_ids=[999 % CFG.vocab_size, eos])
    for row, hit, s in zip(free, first_hits, stopped):
        assert s == (row if hit is None else row[:hit + 1])
    assert stopped[0][-1] == eos and len(stopped[0]) <= 5


def test_stop_strings_with_decode_callback(models):
    _, _, gen = models
    free = gen.generate(PROMPTS, 24)
    decode = lambda toks: " ".join(f"t{t}" for t in toks)  # noqa: E731
    target = free[1][6]
    stop = f"t{target}"
    out = gen.generate(PROMPTS, 24, stop_strings=[stop], decode_fn=decode, stop_check_every=4)
    for row, got in zip(free, out):
        texts = [decode(row[:k]) for k in range(1, len(row) + 1)]
        k = next((i + 1 for i, t in enumerate(texts) if stop in t), len(row))
        assert got == row[:k]
    assert out[1][-1] == target and len(out[1]) <= 7
    with pytest.raises(GorillaError, match="decode_fn"):
        gen.generate(PROMPTS, 4, stop_strings=["x"])


def test_seeded_sampling(models):
    params, _, gen = models
    a = gen.generate(PROMPTS, 16, temperature=1.0, seed=7)
    b = gen.generate(PROMPTS, 16, temperature=1.0, seed=7)
    c = gen.generate(PROMPTS, 16, temperature=1.0, seed=8)
    greedy = gen.generate(PROMPTS, 16)
    assert a == b
    assert a != c and a != greedy
    # top-p so small that only the most likely token survives: sampling becomes greedy
    assert gen.generate(PROMPTS, 16, temperature=1.0, top_p=1e-6, seed=3) == greedy
    # nucleus sampling is reproducible too
    n1 = gen.generate(PROMPTS, 16, temperature=0.8, top_p=0.9, seed=5)
    assert n1 == gen.generate(PROMPTS, 16, temperature=0.8, top_p=0.9, seed=5)
    assert n1 != greedy


def test_sharded_generation_matches_single_device(models):
    params, _, gen = models
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = Generator(params, CFG, pad_id=0, mesh=mesh)
    assert sharded.params["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec("fsdp", "tensor")
    out = sharded.generate(PROMPTS, 10)
    assert out == gen.generate(PROMPTS, 10)
    assert sharded.compiled_shapes == [(4, 16, 16, "greedy")]  # batch a multiple of data*fsdp
    # the cache grown under the mesh (re-constrained to its shardings) decodes the same tokens
    grown = Generator(params, CFG, pad_id=0, mesh=mesh, cache_windows=2)
    assert grown.generate(PROMPTS, 30) == gen.generate(PROMPTS, 30)


def test_bad_inputs_and_helpers(models):
    params, _, gen = models
    with pytest.raises(GorillaError, match="prompt 1 is empty"):
        gen.generate([[1], []], 4)
    with pytest.raises(GorillaError, match="token id 500"):
        gen.generate([[1, 500]], 4)
    assert gen.generate([[1]], 0) == [[]]
    assert gen.generate(PROMPTS, 1) == [row[:1] for row in gen.generate(PROMPTS, 16)]
    assert [bucket(n, 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    # the convenience function gives the same as the Generator, from scanned params too
    scanned = dataclasses.replace(CFG, scan_layers=True)
    assert generate(stack_layers(params, CFG.num_hidden_layers), scanned, PROMPTS[:1], 6) == \
        gen.generate(PROMPTS[:1], 6)
