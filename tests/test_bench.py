"""The throughput benchmark (issue 7) on tiny configs, and the numerics of the performance changes.

The benchmark runs here for a couple of steps per framework and must produce its table, JSON
and chart with positive, finite numbers; no timing is asserted. The performance changes made
for it (fused LM head + cross-entropy, fused q/k/v and gate/up products, the small-rows tied
head) must compute what the plain formulation computes.
"""
import dataclasses
import io
import json
import math
import re
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from gorilla_jax.cli import main
from gorilla_jax.config import ModelConfig
from gorilla_jax.model import LlamaForCausalLM, init_params, llama
from gorilla_jax.model import layers
from gorilla_jax.train.step import head_loss_sums, lm_head, token_loss_sums

TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   tie_word_embeddings=False)


# ----------------------------------------------------------------------------- numerics


def _head_inputs(seed, B, S, D, V, vocab_major):
    """Random hidden states [B, S, D], a head kernel ([V, D] or [D, V]) and targets [B, S]."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(V, D) if vocab_major else (D, V)), jnp.float32)
    return hidden, head, jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32), rng


@pytest.mark.parametrize("vocab_major", [False, True])
def test_head_loss_sums_equals_autodiff_of_the_plain_loss(vocab_major):
    B, S, D, V, z = 2, 5, 8, 13, 1e-3
    hidden, head, targets, _ = _head_inputs(0, B, S, D, V, vocab_major)
    mask = jnp.asarray([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], jnp.int32)

    def plain(h, w):
        logits = jnp.einsum("bsd,vd->bsv" if vocab_major else "bsd,dv->bsv", h, w)
        ce, zl, _ = token_loss_sums(logits, targets, mask, z_loss=z)
        return ce + zl, (ce, zl)

    def fused(h, w):
        return head_loss_sums(h, w, targets, mask, z, vocab_major)

    (want, (want_ce, want_zl)), want_g = jax.value_and_grad(plain, (0, 1), has_aux=True)(hidden, head)
    (got, (got_ce, got_zl)), got_g = jax.jit(jax.value_and_grad(fused, (0, 1), has_aux=True))(hidden, head)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    np.testing.assert_allclose([float(got_ce), float(got_zl)], [float(want_ce), float(want_zl)], rtol=1e-6)
    assert float(got_zl) > 0
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    # masked-out positions get no gradient; without differentiation the primal path is used
    assert np.all(np.asarray(got_g[0])[0, 2] == 0)
    np.testing.assert_allclose(float(jax.jit(fused)(hidden, head)[0]), float(want), rtol=1e-6)


@pytest.mark.parametrize("vocab_major", [False, True])
def test_head_loss_sums_agree_with_the_vocabulary_split_over_devices(vocab_major):
    # one device's vocabulary takes the exponentials-once path (target logits from the head's
    # target vectors), a vocabulary split over a tensor axis the masked-sum path: same sums and
    # gradients (z-loss and masked rows included)
    from jax.sharding import NamedSharding, PartitionSpec as P

    from gorilla_jax.config import MeshConfig
    from gorilla_jax.sharding import activate, make_mesh

    B, S, D, V, z = 4, 6, 16, 64, 1e-3
    hidden, head, targets, rng = _head_inputs(3, B, S, D, V, vocab_major)
    mask = jnp.asarray(rng.integers(0, 2, (B, S)), jnp.int32)

    def run(h, w):
        return jax.jit(jax.value_and_grad(
            lambda h, w: head_loss_sums(h, w, targets, mask, z, vocab_major), (0, 1),
            has_aux=True))(h, w)

    (want, (want_ce, want_zl)), want_g = run(hidden, head)
    mesh = make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))
    with activate(mesh):
        assert not layers.unsplit(("vocab",))
        w_spec = P("tensor", None) if vocab_major else P(None, "tensor")
        (got, (got_ce, got_zl)), got_g = run(
            jax.device_put(hidden, NamedSharding(mesh, P("data"))),
            jax.device_put(head, NamedSharding(mesh, w_spec)))
    np.testing.assert_allclose([float(got), float(got_ce), float(got_zl)],
                               [float(want), float(want_ce), float(want_zl)], rtol=1e-5)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("vocab_major", [False, True])
def test_head_gradient_is_written_over_the_logits(vocab_major):
    # train/step.py arranges the head so that XLA:CPU writes the exponentials (and the target
    # correction) in the logits' own buffer: the compiled gradient's temporaries hold one
    # [B*S, V] array, not two or three (a transposed copy of it, for the tied head). A jax/XLA
    # upgrade that breaks this shows here first.
    if jax.default_backend() != "cpu":
        pytest.skip("the buffer sharing checked here is XLA:CPU's")
    B, S, D, V = 4, 64, 32, 8192
    hidden = jnp.zeros((B, S, D), jnp.float32)
    head = jnp.zeros((V, D) if vocab_major else (D, V), jnp.float32)
    targets = jnp.zeros((B, S), jnp.int32)
    mask = jnp.ones((B, S), jnp.int32)
    grad = jax.jit(jax.grad(lambda h, w, t, m: head_loss_sums(h, w, t, m, 0.0, vocab_major)[0],
                            (0, 1)))
    temp = grad.lower(hidden, head, targets, mask).compile().memory_analysis().temp_size_in_bytes
    logits_bytes = B * S * V * 4
    assert logits_bytes <= temp < 1.5 * logits_bytes, (temp, logits_bytes)


def test_head_gradient_where_the_z_loss_factor_vanishes():
    # the gradient is c * u with u's target entry corrected by s / (1 + 2 z lse): where that
    # factor is exactly 0 the gradient is -onehot (softmax * 0 - onehot), not 0 * inf = NaN
    from gorilla_jax.train.step import _exp_once_grads

    logits = jnp.asarray([[-3.0, -4.0, -2.5, -6.0], [1.0, 2.0, 0.5, 0.0]], jnp.float32)
    targets, mask = jnp.asarray([1, 2], jnp.int32), jnp.ones((2,), jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[:, None], -1)[:, 0]
    lse = _exp_once_grads(logits, targets, mask, 0.0, target_logit)[0]
    z = -0.5 / float(lse[0])
    lse, u, c = _exp_once_grads(logits, targets, mask, z, target_logit)
    assert float(1.0 + 2.0 * z * lse[0]) == 0.0  # the case under test is reached
    got = np.asarray(c[:, None] * u)
    np.testing.assert_allclose(got[0], [0.0, -1.0, 0.0, 0.0], atol=1e-6)
    x = np.asarray(logits, np.float64)[1]
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    np.testing.assert_allclose(got[1], p * (1 + 2 * z * float(lse[1])) - np.eye(4)[2], rtol=1e-5,
                               atol=1e-6)


def test_head_loss_sums_with_logits_far_above_the_target():
    # logits spread over thousands: exp(logit - target logit) would overflow in float32, so
    # this guards the log-sum-exp's shift against any change that drops the row maximum
    rng = np.random.default_rng(1)
    B, S, D, V = 2, 4, 8, 11
    hidden = jnp.asarray(rng.normal(size=(B, S, D)) * 30.0, jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)) * 30.0, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
    mask = jnp.ones((B, S), jnp.int32)
    logits = np.einsum("bsd,dv->bsv", np.asarray(hidden, np.float64), np.asarray(head, np.float64))
    spread = logits.max(-1) - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    assert spread.max() > 500
    lse = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    want_ce = float(spread.sum() + (lse - logits.max(-1)).sum())
    (got, (ce, _)), grads = jax.jit(jax.value_and_grad(
        lambda h, w: head_loss_sums(h, w, targets, mask), (0, 1), has_aux=True))(hidden, head)
    np.testing.assert_allclose(float(ce), want_ce, rtol=1e-5)
    probs = np.exp(logits - lse[..., None])
    d_logits = probs - np.eye(V)[np.asarray(targets)]
    np.testing.assert_allclose(np.asarray(grads[1]),
                               np.einsum("bsd,bsv->dv", np.asarray(hidden, np.float64), d_logits),
                               rtol=1e-4, atol=1e-3)
    assert np.isfinite(np.asarray(grads[0])).all()


def test_lm_head_picks_the_kernel_or_the_tied_embedding():
    untied = init_params(TINY, jax.random.PRNGKey(0))
    w, vocab_major = lm_head(untied, jnp.float32)
    assert w.shape == (TINY.hidden_size, TINY.vocab_size) and not vocab_major
    tied = init_params(dataclasses.replace(TINY, tie_word_embeddings=True), jax.random.PRNGKey(0))
    w, vocab_major = lm_head(tied, jnp.bfloat16)
    assert w.shape == (TINY.vocab_size, TINY.hidden_size) and vocab_major and w.dtype == jnp.bfloat16


def _logits_and_grads(cfg, params, ids):
    model = LlamaForCausalLM(cfg)

    def loss(p):
        logits = model.apply({"params": p}, ids)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), grads


def test_fused_projections_equal_separate_products(monkeypatch):
    params = init_params(TINY, jax.random.PRNGKey(1))
    ids = np.array([[3, 5, 7, 11, 13, 17], [2, 4, 6, 8, 10, 12]])
    monkeypatch.setattr(layers, "FUSE_PROJECTIONS", True)
    fused_logits, fused_grads = _logits_and_grads(TINY, params, ids)
    monkeypatch.setattr(layers, "FUSE_PROJECTIONS", False)
    sep_logits, sep_grads = _logits_and_grads(TINY, params, ids)
    np.testing.assert_allclose(fused_logits, sep_logits, atol=1e-5)
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(sep_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # the param tree (HF names) is the same whichever path computes
    assert set(params["layers_0"]["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(params["layers_0"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}


def test_projections_are_fused_only_for_few_rows_and_unsplit_axes():
    from gorilla_jax.config import MeshConfig
    from gorilla_jax.sharding import activate, make_mesh

    assert layers.can_fuse(("heads", "kv_heads"), 16) and layers.unsplit(("vocab",))
    assert not layers.can_fuse(("heads", "kv_heads"), layers.FUSE_MAX_ROWS + 1)
    with activate(make_mesh(MeshConfig(data=4, fsdp=1, tensor=2))):
        assert not layers.can_fuse(("heads", "kv_heads"), 16) and not layers.unsplit(("vocab",))
    with activate(make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))):
        assert layers.can_fuse(("mlp",), 16) and layers.unsplit(("vocab",))


def test_small_rows_tied_head_equals_the_direct_product(monkeypatch):
    cfg = dataclasses.replace(TINY, tie_word_embeddings=True)
    params = init_params(cfg, jax.random.PRNGKey(2))
    ids = np.array([[3, 5, 7], [2, 4, 6]])  # 6 rows: the small-rows path
    monkeypatch.setattr(layers, "WEIGHT_MAJOR_ROWS", 64)
    small = _logits_and_grads(cfg, params, ids)[0]
    monkeypatch.setattr(layers, "WEIGHT_MAJOR_ROWS", 0)
    direct = _logits_and_grads(cfg, params, ids)[0]
    np.testing.assert_allclose(small, direct, atol=1e-5)


# ----------------------------------------------------------------------------- benchmark


def test_measured_peak_is_a_positive_rate():
    from gorilla_jax.bench.peak import matmul_peak

    for fw in ("jax", "torch"):
        peak = matmul_peak(fw, n=256, repeats=2)
        assert peak["flops_per_sec"] > 0 and math.isfinite(peak["flops_per_sec"])
        assert peak["flops_per_sec"] >= peak["median_flops_per_sec"] and len(peak["seconds"]) == 2


def test_numpy_weights_load_into_both_frameworks_identically():
    import torch
    import transformers

    from gorilla_jax.bench.train_bench import numpy_weights
    from gorilla_jax.convert.hf import config_to_hf_dict
    from gorilla_jax.model import hf_to_params

    weights = numpy_weights(TINY, seed=3)
    assert np.all(weights["model.norm.weight"] == 1.0)
    assert 0.015 < float(np.std(weights["model.embed_tokens.weight"])) < 0.025
    ids = np.array([[1, 5, 9, 33, 60]])
    ours = LlamaForCausalLM(TINY).apply({"params": hf_to_params(weights, TINY)}, ids)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf_dict(TINY, "float32")))
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_torch_adamw_implementations_train_alike_and_bad_names_are_refused():
    # the PyTorch baseline's AdamW implementation is a benchmark option: each must be the
    # AdamW it names and give the same training run as torch's default implementation
    from gorilla_jax.bench.train_bench import TorchTrainRunner, TrainBenchSpec

    import torch

    spec = TrainBenchSpec(model=TINY, batch=2, seq=16, learning_rate=1e-2, warmup_steps=0)
    losses, impls = {}, {}
    try:
        for impl in ("default", "foreach", "fused"):
            runner = TorchTrainRunner(dataclasses.replace(spec, torch_adamw=impl))
            info = runner.setup()  # sets PyTorch's flush-to-zero mode for this process
            assert info["torch_adamw"] == impl
            impls[impl] = {k: runner.optimizer.defaults[k] for k in ("foreach", "fused")}
            losses[impl] = runner.run(6).losses
    finally:
        torch.set_flush_denormal(False)
    assert impls["default"] == {"foreach": None, "fused": None}
    assert impls["foreach"]["foreach"] is True and impls["fused"]["fused"] is True
    assert losses["default"][-1] < losses["default"][0] - 0.05  # it trains (lr 1e-2)
    for impl in ("foreach", "fused"):
        np.testing.assert_allclose(losses[impl], losses["default"], rtol=1e-5)
    with pytest.raises(ValueError, match="torch_adamw 'adam8bit': one of default, foreach, fused"):
        TorchTrainRunner(dataclasses.replace(spec, torch_adamw="adam8bit")).setup()


def _tiny_config_file(tmp_path, tied=False):
    cfg = {"model": {**dataclasses.asdict(TINY), "tie_word_embeddings": tied},
           "optimizer": {"learning_rate": 1e-3, "weight_decay": 0.1, "grad_clip": 1.0},
           "train": {"global_batch_size": 2}, "data": {"seq_len": 16}}
    path = tmp_path / "tiny_bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_cli(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_bench_compare_on_a_tiny_config_produces_table_json_and_chart(tmp_path):
    cfg = _tiny_config_file(tmp_path)
    out_dir = tmp_path / "out"
    code, text = _run_cli(["bench", "compare", "--model", str(cfg),
                           "--frameworks", "jax,torch,torch-compile", "--rounds", "2",
                           "--steps", "2", "--warmup", "1", "--threads", "2",
                           "--out", str(out_dir)])
    assert code == 0
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("framework"))
    for col in ("step ms", "tokens/s", "TFLOP/s", "MFU", "peak mem"):
        assert col in lines[header]
    rows = {line.split()[0]: line.split() for line in lines[header + 1:header + 4]}
    assert set(rows) == {"jax", "torch", "torch-compile"}
    ratio_line = next(line for line in lines if line.startswith("jax_over_torch:"))
    assert re.search(r"by round \d+\.\d\d-\d+\.\d\dx, met in [012] of 2\)$", ratio_line)
    assert any(line.startswith("jax_over_torch_compile:") for line in lines)
    title = next(line for line in lines if line.startswith("train step: LLaMA"))
    assert title.endswith("AdamW (PyTorch's: torch's default implementation)"), title

    result = json.loads((out_dir / "compare_train.json").read_text())
    assert result["batch"] == 2 and result["seq"] == 16 and result["threads"] == 2
    assert result["tokens_per_step"] == 32 and result["flops_per_step"] > 0
    assert result["optimizer"]["torch_adamw"] == "default"
    assert result["peak_flops_per_sec"] > 0
    for fw in ("jax", "torch", "torch-compile"):
        r = result["frameworks"][fw]
        st = r["step_time_s"]
        assert st["n"] == 4 and 0 < st["min"] <= st["median"] <= st["max"]
        assert len(r["round_median_step_s"]) == 2
        assert all(st["min"] <= m <= st["max"] for m in r["round_median_step_s"])
        for key in ("tokens_per_sec", "tflops_per_sec", "mfu", "peak_memory_bytes"):
            assert r[key] > 0 and math.isfinite(r[key]), (fw, key)
        assert r["memory_kind"] == "rss" and r["params"] == result["model"]["params"]
    jx, th = result["frameworks"]["jax"], result["frameworks"]["torch"]
    # the same weights, data and optimizer: the same losses, first step and after 7 updates
    assert abs(jx["first_loss"] - th["first_loss"]) < 1e-4
    assert abs(jx["last_loss"] - th["last_loss"]) < 1e-3
    assert jx["last_loss"] < jx["first_loss"]
    assert abs(result["frameworks"]["torch-compile"]["last_loss"] - th["last_loss"]) < 1e-3
    assert result["jax_over_torch"] == pytest.approx(jx["tokens_per_sec"] / th["tokens_per_sec"])
    t = result["targets"]["jax_over_torch"]
    assert t["target"] == 1.3
    assert t["ratio_by_round"] == pytest.approx(
        [o / j for j, o in zip(jx["round_median_step_s"], th["round_median_step_s"])])
    assert t["rounds_met"] == sum(r >= 1.3 for r in t["ratio_by_round"])
    assert (out_dir / "compare_train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_train_single_framework_json_and_profile(tmp_path):
    cfg = _tiny_config_file(tmp_path, tied=True)
    code, text = _run_cli(["bench", "train", "--framework", "jax", "--model", str(cfg),
                           "--batch", "2", "--seq", "8", "--steps", "2", "--json",
                           "--profile", str(tmp_path / "trace")])
    assert code == 0
    result = json.loads(text.strip().splitlines()[-1])
    assert list(result["frameworks"]) == ["jax"] and "jax_over_torch" not in result
    r = result["frameworks"]["jax"]
    assert r["step_time_s"]["n"] == 2 and r["tokens_per_sec"] > 0
    ops = r["profile_top_ops_ms"]
    assert ops and all(ms >= 0 for _, ms, _ in ops)
    assert any(src.startswith(("fwd/", "bwd/", "step/")) for _, _, src in ops)
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))
    hlo = list((tmp_path / "trace").rglob("train_step.hlo.txt"))
    assert len(hlo) == 1 and "HloModule" in hlo[0].read_text()


def test_bench_generate_tiny_decodes_the_same_tokens(tmp_path):
    cfg = _tiny_config_file(tmp_path, tied=True)
    code, text = _run_cli(["bench", "generate", "--model", str(cfg), "--batches", "1,3",
                           "--prompt-len", "6", "--new-tokens", "5", "--rounds", "1", "--json",
                           "--out", str(tmp_path / "gen")])
    assert code == 0
    result = json.loads(text.strip().splitlines()[-1])
    assert result["new_tokens"] == 5 and result["greedy"]
    for fw in ("jax", "torch"):
        for b in ("1", "3"):
            s = result["frameworks"][fw]["batches"][b]
            assert s["tokens_per_sec"] > 0 and math.isfinite(s["tokens_per_sec"])
    assert set(result["jax_over_torch"]) == {"1", "3"}
    assert result["token_agreement"] == {"1": 1.0, "3": 1.0}
    assert result["targets"]["batch_1"]["target"] == 2.0
    assert (tmp_path / "gen" / "compare_decode.png").exists()


def test_bench_bad_arguments_are_one_line_errors(tmp_path, capsys):
    cfg = _tiny_config_file(tmp_path)
    assert main(["bench", "compare", "--model", str(cfg), "--frameworks", "jax,mxnet"]) == 2
    assert "mxnet" in capsys.readouterr().err
    assert main(["bench", "generate", "--model", str(cfg), "--batches", "1,x"]) == 2
    assert "--batches" in capsys.readouterr().err
    assert main(["bench", "train", "--framework", "jax", "--model", str(cfg), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["bench", "compare", "--model", str(tmp_path / "missing.yaml")]) == 2
