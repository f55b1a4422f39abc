"""HF interop: hf-to-flax / flax-to-hf / apply-delta against transformers, bad inputs, memory."""
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from gorilla_jax.checkpoint import load_params, read_model_config, save_params
from gorilla_jax.cli import main
from gorilla_jax.config import MeshConfig, ModelConfig, RopeScaling
from gorilla_jax.convert import apply_delta, flax_to_hf, hf_to_flax, read_hf_config
from gorilla_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from gorilla_jax.errors import GorillaError
from gorilla_jax.loading import load_model
from gorilla_jax.model import LlamaForCausalLM, init_params

CASES = {
    # GQA (6 query / 2 kv heads), llama3 rope scaling, untied, odd vocab.
    "gqa_llama3_untied": dict(
        vocab_size=131, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
        tie_word_embeddings=False, rms_norm_eps=1e-5),
    # Multi-head, tied embeddings, linear rope scaling, 3 layers.
    "mha_tied_linear": dict(
        vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
        num_attention_heads=5, num_key_value_heads=5, max_position_embeddings=64,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        tie_word_embeddings=True, rms_norm_eps=1e-6),
}
IDS = np.random.default_rng(0).integers(0, 97, size=(2, 19))


def make_hf_model(kwargs, seed=0, dtype=torch.float32):
    """A transformers LlamaForCausalLM with random weights, norm scales included."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(attn_implementation="eager", **kwargs)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model.to(dtype)


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


def jax_logits(cfg, params, ids):
    fn = jax.jit(lambda p, i: LlamaForCausalLM(cfg).apply({"params": p}, i))
    return np.asarray(fn(params, jnp.asarray(ids)))


def read_all(hf_dir: Path) -> dict:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with SafetensorsFile(f) as st:
            out.update({n: st.read(n) for n in st.keys()})
    return out


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> (HF directory written by transformers' save_pretrained, torch model)."""
    root = tmp_path_factory.mktemp("hf_models")
    out = {}
    for name, kwargs in CASES.items():
        model = make_hf_model(kwargs)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


@pytest.fixture(scope="session")
def converted(hf_models, tmp_path_factory):
    """name -> params checkpoint converted by the CLI."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, (hf_dir, _) in hf_models.items():
        assert main(["convert", "hf-to-flax", "--hf-dir", str(hf_dir), "--out",
                     str(root / name)]) == 0
        out[name] = root / name
    return out


def assert_nothing_left(out: Path):
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(out.name + ".tmp-")]
    assert not leftovers


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_logits_match_transformers(name, hf_models, converted):
    hf_dir, model = hf_models[name]
    ref = torch_logits(model, IDS)
    cfg, params = load_model(converted[name])
    assert cfg.tie_word_embeddings == CASES[name]["tie_word_embeddings"]
    assert ("lm_head" in params) != cfg.tie_word_embeddings
    assert np.abs(jax_logits(cfg, params, IDS) - ref).max() <= 1e-4
    # Straight from the HF directory, no checkpoint in between: the same numbers.
    cfg2, params2 = load_model(hf_dir)
    assert cfg2 == cfg
    assert np.abs(jax_logits(cfg2, params2, IDS) - ref).max() <= 1e-4


def test_checkpoint_layout_and_config(hf_models, converted):
    ckpt = converted["gqa_llama3_untied"]
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "generation_config.json", "gorilla_jax.json", "model_config.yaml", "params"]
    marker = json.loads((ckpt / "gorilla_jax.json").read_text())
    assert marker["format"] == "gorilla-jax-params" and marker["eos_token_ids"] == [2]
    cfg = read_model_config(ckpt)
    assert cfg.rope_scaling == RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=32)
    assert (cfg.rope_theta, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps) == (
        500000.0, 2, 8, 1e-5)
    assert read_model_config(converted["mha_tied_linear"]).rope_scaling.type == "linear"


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_hf_flax_hf_identical(name, hf_models, converted, tmp_path):
    hf_dir, model = hf_models[name]
    out = tmp_path / "hf"
    # A small shard size forces a sharded checkpoint with an index.
    assert main(["convert", "flax-to-hf", "--checkpoint", str(converted[name]), "--out", str(out),
                 "--max-shard-size", "30KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    original, back = read_all(hf_dir), read_all(out)
    assert set(back) == set(original)
    assert ("lm_head.weight" in back) != CASES[name]["tie_word_embeddings"]
    for tensor_name, value in back.items():
        assert value.dtype == original[tensor_name].dtype
        np.testing.assert_array_equal(value, original[tensor_name], err_msg=tensor_name)
    # transformers loads it (safetensors index, config.json, generation_config.json) and
    # computes exactly the original logits.
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager")
    np.testing.assert_array_equal(torch_logits(reloaded, IDS), torch_logits(model, IDS))
    # The source's generation_config.json travelled through the checkpoint.
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == json.loads((hf_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    # And our converter reads its own output back to the same config.
    assert read_hf_config(out) == read_model_config(converted[name])


def test_transformers4_config_sharded_index_and_bin(hf_models, tmp_path):
    """config.json as transformers 4 wrote it; sharded safetensors; pytorch_model.bin."""
    hf_dir, model = hf_models["mha_tied_linear"]
    ref = torch_logits(model, IDS)
    t4 = dict(json.loads((hf_dir / "config.json").read_text()))
    rope = t4.pop("rope_parameters")
    t4.pop("dtype", None)
    t4.update(torch_dtype="float32", rope_theta=rope["rope_theta"],
              rope_scaling={"type": "linear", "factor": 2.0}, transformers_version="4.40.0")
    sharded = tmp_path / "t4_sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    (sharded / "config.json").write_text(json.dumps(t4))
    assert read_hf_config(sharded) == read_hf_config(hf_dir)
    cfg, params = load_model(sharded)
    assert np.abs(jax_logits(cfg, params, IDS) - ref).max() <= 1e-4

    # pytorch_model.bin (torch.save of the state dict, as transformers 4 wrote it) and a
    # sharded .bin with its index.
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copyfile(sharded / "config.json", binary / "config.json")
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, binary / "pytorch_model.bin")
    cfg, params = load_model(binary)
    assert np.abs(jax_logits(cfg, params, IDS) - ref).max() <= 1e-4
    sharded_bin = tmp_path / "bin_sharded"
    sharded_bin.mkdir()
    shutil.copyfile(sharded / "config.json", sharded_bin / "config.json")
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for fname, part in halves.items():
        torch.save({n: state[n] for n in part}, sharded_bin / fname)
    (sharded_bin / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in halves.items() for n in part}}))
    cfg, params = load_model(sharded_bin)
    assert np.abs(jax_logits(cfg, params, IDS) - ref).max() <= 1e-4


def test_bfloat16_round_trip_and_dtype_cast(hf_models, tmp_path):
    hf_dir, model = hf_models["gqa_llama3_untied"]
    bf16_dir = tmp_path / "bf16"
    make_hf_model(CASES["gqa_llama3_untied"], dtype=torch.bfloat16).save_pretrained(bf16_dir)
    assert json.loads((bf16_dir / "config.json").read_text())["dtype"] == "bfloat16"
    ckpt = hf_to_flax(bf16_dir, tmp_path / "ckpt", dtype="bfloat16")
    cfg, params = load_params(ckpt)
    assert cfg.param_dtype == "bfloat16"
    assert params["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == ml_dtypes.bfloat16
    out = flax_to_hf(ckpt, tmp_path / "hf_back")
    original, back = read_all(bf16_dir), read_all(out)
    assert set(back) == set(original)
    for name, value in back.items():
        assert value.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(value.view(np.uint16), original[name].view(np.uint16))
    with safe_open(out / "model.safetensors", framework="pt") as f:  # the reference reader
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    # bf16 on disk, float32 in memory: an exact widening.
    _, params32 = load_model(bf16_dir)
    np.testing.assert_array_equal(params32["norm"]["scale"],
                                  original["model.norm.weight"].astype(np.float32))


# ----------------------------------------------------------------------------- checkpoints


def test_load_onto_mesh_cast_and_scan(converted):
    from gorilla_jax.sharding import make_mesh, param_shardings

    ckpt = converted["gqa_llama3_untied"]
    cfg, host = load_model(ckpt)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg_m, sharded = load_model(ckpt, mesh=mesh)
    expected = param_shardings(cfg, mesh)
    for (path, leaf), want in zip(jax.tree_util.tree_flatten_with_path(sharded)[0],
                                  jax.tree.leaves(expected)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), path
        np.testing.assert_array_equal(np.asarray(leaf), _get(host, path))
    # The HF directory placed onto the mesh tensor by tensor gives the same shardings.
    _, from_hf = load_model(Path(json.loads((ckpt / "gorilla_jax.json").read_text())["source"]),
                            mesh=mesh)
    assert jax.tree.map(lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim),
                        from_hf, sharded) == jax.tree.map(lambda _: True, sharded)
    cfg16, p16 = load_model(ckpt, dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(p16)} == {np.dtype(ml_dtypes.bfloat16)}
    cfg_s, scanned = load_model(ckpt, scan_layers=True)
    assert cfg_s.scan_layers and scanned["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == 2
    np.testing.assert_allclose(jax_logits(cfg_s, scanned, IDS), jax_logits(cfg, host, IDS),
                               atol=1e-5)


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_save_params_api(tmp_path):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, scan_layers=True)
    params = jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(3))
    assert "layers" in params
    path = save_params(tmp_path / "p", params, cfg)
    restored_cfg, restored = load_params(path, scan_layers=False)
    assert "layers_1" in restored and not restored_cfg.scan_layers
    np.testing.assert_array_equal(restored["layers_1"]["self_attn"]["o_proj"]["kernel"],
                                  np.asarray(params["layers"]["self_attn"]["o_proj"]["kernel"][1]))
    assert dataclasses.replace(restored_cfg, scan_layers=True) == cfg
    with pytest.raises(GorillaError, match="already exists"):
        save_params(path, params, cfg)
    wrong = dataclasses.replace(cfg, intermediate_size=40)
    with pytest.raises(GorillaError, match=r"parameter layers_0/mlp/down_proj/kernel has shape \(48, 32\), "
                                           r"the config expects \(40, 32\)"):
        load_params(path, wrong)


# ----------------------------------------------------------------------------- bad input


def _rewrite_weights(hf_dir: Path, edit):
    """Rewrite model.safetensors with edit(dict of tensors) applied."""
    tensors = read_all(hf_dir)
    edit(tensors)
    (hf_dir / "model.safetensors").unlink()
    specs = [(n, v.shape, v.dtype) for n, v in tensors.items()]
    write_safetensors(hf_dir / "model.safetensors", specs, tensors.__getitem__, {"format": "pt"})


def _break_config(key, value):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


BAD_INPUTS = {
    "missing_config": (lambda d: (d / "config.json").unlink(), r"config\.json: missing"),
    "malformed_config": (lambda d: (d / "config.json").write_text('{\n  "model_type": "llama",\n'),
                         r"config\.json:3:1: invalid JSON"),
    "unsupported_architecture": (_break_config("architectures", ["MistralForCausalLM"]),
                                 r"config\.json: unsupported architecture \['MistralForCausalLM'\]"),
    "unsupported_model_type": (_break_config("model_type", "gpt2"),
                               r"config\.json: unsupported model_type 'gpt2'"),
    "attention_bias": (_break_config("attention_bias", True), r"config\.json: 'attention_bias: true'"),
    "activation": (_break_config("hidden_act", "gelu"), r"config\.json: hidden_act 'gelu'"),
    "rope_type": (_break_config("rope_parameters", {"rope_type": "yarn", "factor": 4.0}),
                  r"config\.json: rope_parameters\.rope_type 'yarn' is not supported"),
    "bad_heads": (_break_config("num_key_value_heads", 4),
                  r"config\.json: .*num_key_value_heads.*must divide num_attention_heads"),
    "missing_tensor": (lambda d: _rewrite_weights(
        d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight .*model\.safetensors"),
    "shape_mismatch": (lambda d: _rewrite_weights(
        d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 48), np.float32)})),
        r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape "
        r"\(8, 48\), expected \(16, 48\)"),
    "unexpected_tensor": (lambda d: _rewrite_weights(
        d, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(48, np.float32)})),
        r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.bias' is not part of"),
    "truncated_weights": (lambda d: os.truncate(d / "model.safetensors",
                                                (d / "model.safetensors").stat().st_size - 100),
                          r"model\.safetensors: tensor '.*': data offsets .* \(file truncated\?\)"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), r"no weights \(model\.safetensors"),
    "index_missing_shard": (lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})),
        r"model\.safetensors\.index\.json: tensor 'model\.norm\.weight' is in "
        r"'model-00002-of-00002\.safetensors', which does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_hf_input_is_a_clear_error_and_leaves_nothing(case, hf_models, tmp_path, capsys):
    src, _ = hf_models["gqa_llama3_untied"]
    hf_dir = tmp_path / "hf"
    shutil.copytree(src, hf_dir)
    breaker, pattern = BAD_INPUTS[case]
    breaker(hf_dir)
    out = tmp_path / "out"
    assert main(["convert", "hf-to-flax", "--hf-dir", str(hf_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gorilla-jax convert: error: ")
    assert re.search(pattern, err), err
    assert str(hf_dir) in err  # the message names the file
    assert_nothing_left(out)


def test_bad_checkpoint_and_existing_output(converted, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["convert", "flax-to-hf", "--checkpoint", str(tmp_path), "--out", str(out)]) == 2
    assert "not a gorilla-jax params checkpoint" in capsys.readouterr().err
    assert_nothing_left(out)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main(["convert", "flax-to-hf", "--checkpoint", str(converted["mha_tied_linear"]),
                 "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


# ----------------------------------------------------------------------------- apply-delta


def test_apply_delta_with_vocab_growth(hf_models, tmp_path, capsys):
    base_dir, base = hf_models["gqa_llama3_untied"]
    grown = dict(CASES["gqa_llama3_untied"], vocab_size=133)  # fine-tuning added 2 tokens
    target = make_hf_model(grown, seed=1)
    base_sd, target_sd = base.state_dict(), target.state_dict()
    delta = {}
    for name, t in target_sd.items():
        d = t.clone()
        b = base_sd[name]
        d[: b.shape[0]] -= b  # rows beyond the base's vocabulary stay the target's own
        delta[name] = d.half()  # released deltas are fp16
    delta_dir = tmp_path / "delta"
    delta_dir.mkdir()
    target.config.save_pretrained(delta_dir)
    names = sorted(delta)  # a sharded .bin delta, as Gorilla's was published
    parts = {"pytorch_model-00001-of-00002.bin": names[::2],
             "pytorch_model-00002-of-00002.bin": names[1::2]}
    for fname, part in parts.items():
        torch.save({n: delta[n] for n in part}, delta_dir / fname)
    (delta_dir / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in parts.items() for n in part}}))
    out = tmp_path / "gorilla"
    assert main(["convert", "apply-delta", "--base", str(base_dir), "--delta", str(delta_dir),
                 "--out", str(out)]) == 0
    merged = read_all(out)
    assert set(merged) == set(target_sd)
    for name, value in merged.items():
        assert value.dtype == np.float16
        want = delta[name].float().numpy()
        want[: base_sd[name].shape[0]] += base_sd[name].numpy()
        np.testing.assert_array_equal(value, want.astype(np.float16), err_msg=name)
        np.testing.assert_allclose(value.astype(np.float32), target_sd[name].numpy(), atol=2e-3)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 133
    cfg, params = load_model(out)
    assert cfg.vocab_size == 133 and params["embed_tokens"]["embedding"].shape == (133, 48)

    # Errors name the tensor and both sides; nothing is written.
    bad = tmp_path / "bad_delta"
    shutil.copytree(delta_dir, bad)
    part = torch.load(bad / "pytorch_model-00001-of-00002.bin", weights_only=True)
    victim = next(n for n in part if "mlp.up_proj" in n)
    part[victim] = torch.zeros(3, 3, dtype=torch.float16)
    torch.save(part, bad / "pytorch_model-00001-of-00002.bin")
    out2 = tmp_path / "out2"
    assert main(["convert", "apply-delta", "--base", str(base_dir), "--delta", str(bad),
                 "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert f"tensor '{victim}' has shape (3, 3) but the base's" in err
    assert "pytorch_model-00001-of-00002.bin" in err and "model.safetensors" in err
    assert_nothing_left(out2)
    other = tmp_path / "other_delta"
    shutil.copytree(delta_dir, other)
    cfg_json = json.loads((other / "config.json").read_text())
    cfg_json["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(cfg_json))
    assert main(["convert", "apply-delta", "--base", str(base_dir), "--delta", str(other),
                 "--out", str(out2)]) == 2
    assert "'num_hidden_layers' is 3 but the base" in capsys.readouterr().err
    assert_nothing_left(out2)


def test_apply_delta_missing_tensor(hf_models, tmp_path):
    base_dir, base = hf_models["mha_tied_linear"]
    delta_dir = tmp_path / "delta"
    shutil.copytree(base_dir, delta_dir)
    _rewrite_weights(delta_dir, lambda t: t.pop("model.layers.2.input_layernorm.weight"))
    with pytest.raises(GorillaError, match=r"the delta lacks tensor "
                                           r"'model\.layers\.2\.input_layernorm\.weight'"):
        apply_delta(base_dir, delta_dir, tmp_path / "out")
    assert_nothing_left(tmp_path / "out")


# ----------------------------------------------------------------------------- memory

_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from gorilla_jax.convert import hf_to_flax

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    root = Path(sys.argv[1])
    hf_to_flax(root / "small", root / "small_ckpt")  # imports and one-off allocations
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    hf_to_flax(root / "big", root / "big_ckpt")
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_hf_to_flax_peak_memory_is_one_copy(tmp_path):
    """Streaming: the converter's peak RSS stays near one copy of the model."""
    from gorilla_jax.config import ModelConfig
    from gorilla_jax.convert.hf import config_to_hf_dict, write_hf_weights
    from gorilla_jax.model import hf_tensor_shapes

    rng = np.random.default_rng(0)
    for name, cfg in {
        "small": ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
        "big": ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376,
                           num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
    }.items():
        d = tmp_path / name
        d.mkdir()
        shapes = hf_tensor_shapes(cfg)
        write_hf_weights(d, [(n, s, np.float32) for n, s in shapes.items()],
                         lambda n: rng.standard_normal(shapes[n], dtype=np.float32), "40MB")
        (d / "config.json").write_text(json.dumps(config_to_hf_dict(cfg, "float32")))
    model_bytes = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    assert model_bytes > 100e6
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, check=True, env={**os.environ, "XLA_FLAGS": ""})
    mem = json.loads(res.stdout.strip().splitlines()[-1])
    extra = mem["peak"] - mem["base"]
    # One copy of the converted model, plus a few tensors in flight. Loading the state dict
    # and then converting it (or letting Orbax copy the whole tree) would need >= 2 copies.
    assert extra < 1.4 * model_bytes, (extra, model_bytes)
    cfg, params = load_params(tmp_path / "big_ckpt")
    with SafetensorsFile(next((tmp_path / "big").glob("*00001*.safetensors"))) as f:
        np.testing.assert_array_equal(params["embed_tokens"]["embedding"],
                                      f.read("model.embed_tokens.weight"))


# ----------------------------------------------------------------------------- generate CLI


def test_generate_cli_matches_transformers(tmp_path, capsys):
    """`gorilla-jax generate` on a converted tiny model with its own trained tokenizer."""
    from gorilla_jax.tokenizer import train_sentencepiece

    import inspect
    import argparse as corpus_module

    tok_dir = tmp_path / "tok"
    train_sentencepiece([inspect.getsource(corpus_module)], 512, tok_dir)
    kwargs = dict(CASES["gqa_llama3_untied"], vocab_size=512, bos_token_id=1, eos_token_id=2)
    model = make_hf_model(kwargs, seed=2)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    for f in tok_dir.iterdir():
        shutil.copyfile(f, hf_dir / f.name)
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "hf-to-flax", "--hf-dir", str(hf_dir), "--out", str(ckpt)]) == 0
    capsys.readouterr()
    prompt = "parser.add_argument("
    assert main(["generate", "--model", str(ckpt), "--prompt", prompt, "--max-new-tokens", "12",
                 "--greedy", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    prompt_ids = result["prompt_token_ids"]
    assert prompt_ids[0] == 1 and len(prompt_ids) > 3  # BOS + the prompt, from the ckpt's tokenizer
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=12,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             eos_token_id=2, pad_token_id=3)
    assert result["token_ids"] == ref[0, len(prompt_ids):].tolist()
    assert result["sampling"] == "greedy"
    # Sampling with a seed is reproducible; the HF directory works as --model too.
    runs = []
    for model_path in (ckpt, hf_dir):
        assert main(["generate", "--model", str(model_path), "--tokenizer", str(tok_dir),
                     "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0.8",
                     "--top-p", "0.9", "--seed", "5", "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0] == runs[1] and runs[0]["sampling"]["seed"] == 5
    assert all(0 <= i < 512 for i in runs[0]["token_ids"])
    # --cache-windows reaches the Generator: a cache grown in 3 windows or allocated at once
    # gives transformers' 40 greedy tokens, and 0 windows is refused
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=40,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             eos_token_id=2, pad_token_id=3)
    for windows in ("1", "3"):
        assert main(["generate", "--model", str(ckpt), "--prompt", prompt, "--max-new-tokens",
                     "40", "--json", "--cache-windows", windows]) == 0
        assert json.loads(capsys.readouterr().out)["token_ids"] == ref[0, len(prompt_ids):].tolist()
    assert main(["generate", "--model", str(ckpt), "--prompt", prompt, "--cache-windows", "0"]) == 2
    assert "cache_windows must be >= 1" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--json"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err
