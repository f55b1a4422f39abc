"""Optimizer from config, the loss, and gradient accumulation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gorilla_jax.config import ModelConfig, OptimizerConfig
from gorilla_jax.model import LlamaForCausalLM, init_params
from gorilla_jax.train.optimizer import make_optimizer, make_schedule, weight_decay_mask
from gorilla_jax.train.step import TrainState, make_train_step, token_loss_sums

TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_schedule_warmup_then_cosine_and_linear():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine",
                          end_learning_rate_ratio=0.1)
    s = make_schedule(cfg, 110)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
    assert float(s(110)) == pytest.approx(0.1, abs=1e-6)
    lin = make_schedule(OptimizerConfig(learning_rate=2.0, warmup_steps=0, schedule="linear"), 100)
    assert float(lin(0)) == pytest.approx(2.0) and float(lin(50)) == pytest.approx(1.0)
    const = make_schedule(OptimizerConfig(learning_rate=3.0, warmup_steps=4, schedule="constant"), 100)
    assert float(const(2)) == pytest.approx(1.5) and float(const(90)) == pytest.approx(3.0)


def test_weight_decay_mask_excludes_norms_and_embeddings():
    params = init_params(TINY, jax.random.PRNGKey(0))
    mask = weight_decay_mask(params, [r"norm", r"embed_tokens"])
    assert mask["embed_tokens"]["embedding"] is False
    assert mask["norm"]["scale"] is False
    assert mask["layers_0"]["input_layernorm"]["scale"] is False
    assert mask["layers_0"]["self_attn"]["q_proj"]["kernel"] is True
    assert mask["layers_1"]["mlp"]["down_proj"]["kernel"] is True


def test_token_loss_sums_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    mask = np.array([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]])
    ce, zl, n = token_loss_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=1e-2)
    lse = np.log(np.exp(logits).sum(-1))
    want = ((lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]) * mask).sum()
    assert float(n) == 5.0
    np.testing.assert_allclose(float(ce), want, rtol=1e-5)
    np.testing.assert_allclose(float(zl), 1e-2 * (lse ** 2 * mask).sum(), rtol=1e-5)


def _batch(rng, b, s):
    ids = rng.integers(3, TINY.vocab_size, (b, s + 1))
    lengths = rng.integers(s // 2, s + 1, b)
    mask = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask,
            "segment_ids": mask, "positions": np.tile(np.arange(s), (b, 1))}


def _one_step(micro_batches, batch, sgd=False):
    model = LlamaForCausalLM(TINY)
    params = init_params(TINY, jax.random.PRNGKey(1))
    opt_cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)
    # Plain SGD with rate 1 makes the update equal to the gradient: compared exactly below.
    opt = optax.sgd(1.0) if sgd else make_optimizer(opt_cfg, 10, params)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=opt.init(params),
                       rng=jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model.apply, opt, micro_batches=micro_batches))
    return step(state, jax.tree.map(jnp.asarray, batch))


def test_gradient_accumulation_equals_one_big_batch():
    batch = _batch(np.random.default_rng(3), 8, 16)
    s1, m1 = _one_step(1, batch, sgd=True)
    s4, m4 = _one_step(4, batch, sgd=True)
    assert float(m1["tokens"]) == float(batch["loss_mask"].sum())
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
    assert int(s4.step) == 1
    # An AdamW step from config (clipping, decay mask) moves the parameters.
    a1, am1 = _one_step(1, batch)
    np.testing.assert_allclose(float(am1["loss"]), float(m1["loss"]), rtol=1e-6)
    # The update moved the parameters.
    p0 = init_params(TINY, jax.random.PRNGKey(1))
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(a1.params)))
    assert moved > 1e-3


@pytest.mark.parametrize("clip", [1e-3, 1e3])  # clipping applies / does not
def test_step_clips_and_updates_like_optax_on_the_mean_gradient(clip):
    # The step passes the norm of the summed gradients to our clip transform; the reference is
    # optax's own clip_by_global_norm on jax.grad of the mean loss. With SGD at rate 1 the
    # update is the clipped gradient itself; AdamW from config is compared after it.
    from gorilla_jax.train.optimizer import clip_by_global_norm
    batch = jax.tree.map(jnp.asarray, _batch(np.random.default_rng(5), 4, 16))
    model = LlamaForCausalLM(TINY)
    params = init_params(TINY, jax.random.PRNGKey(1))

    def mean_loss(p):
        logits = model.apply({"params": p}, batch["input_ids"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"])
        ce, _, n = token_loss_sums(logits, batch["targets"], batch["loss_mask"])
        return ce / n

    grads = jax.grad(mean_loss)(params)
    norm = float(optax.global_norm(grads))
    assert (norm > clip) == (clip < 1)

    def step(opt):
        state = TrainState(step=jnp.int32(0), params=params, opt_state=opt.init(params),
                           rng=jax.random.PRNGKey(0))
        return jax.jit(make_train_step(model.apply, opt))(state, batch)

    def reference(opt):
        return optax.apply_updates(params, opt.update(grads, opt.init(params), params)[0])

    new, metrics = step(optax.chain(clip_by_global_norm(clip), optax.sgd(1.0)))
    want = reference(optax.chain(optax.clip_by_global_norm(clip), optax.sgd(1.0)))
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    moved = [np.asarray(a) - np.asarray(p) for a, p in zip(jax.tree.leaves(new.params),
                                                           jax.tree.leaves(params))]
    wanted = [np.asarray(b) - np.asarray(p) for b, p in zip(jax.tree.leaves(want),
                                                            jax.tree.leaves(params))]
    np.testing.assert_allclose(np.sqrt(sum((m ** 2).sum() for m in moved)), min(norm, clip),
                               rtol=1e-4)
    biggest = max(np.abs(w).max() for w in wanted)
    for m, w in zip(moved, wanted):
        np.testing.assert_allclose(m, w, rtol=1e-3, atol=1e-3 * biggest)

    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant",
                          weight_decay=0.1, grad_clip=clip)
    new, _ = step(make_optimizer(cfg, 10, params))
    want = reference(optax.chain(optax.clip_by_global_norm(clip), optax.adamw(
        1e-2, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.1,
        mask=weight_decay_mask(params, cfg.weight_decay_exclude))))
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
        # AdamW's first update is g / (|g| + eps): gradients near eps amplify rounding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=5e-5)

    # without a norm passed in, the transform computes it (and clips to it)
    clipped, _ = clip_by_global_norm(clip).update(grads, optax.EmptyState())
    np.testing.assert_allclose(float(optax.global_norm(clipped)), min(norm, clip), rtol=1e-5)


def test_embedding_gradient_is_not_filled_during_the_forward(monkeypatch):
    # model.layers.embedding_lookup starts the [V, D] gradient's zero fill only once the
    # cotangent exists; autodiff's fill has no operands and XLA:CPU ran it early, so the buffer
    # was alive beside the logits. Gradients equal autodiff's of jnp.take, repeated ids included.
    if jax.default_backend() != "cpu":
        pytest.skip("the schedule checked here is XLA:CPU's")
    from gorilla_jax.model import llama
    from gorilla_jax.train.step import _forward_sums
    cfg = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    B, S = 4, 64
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (B, S)), jnp.int32)  # repeats
    batch = {"input_ids": ids, "targets": jnp.roll(ids, -1, 1), "loss_mask": jnp.ones((B, S)),
             "positions": jnp.broadcast_to(jnp.arange(S), (B, S)),
             "segment_ids": jnp.ones((B, S), jnp.int32)}
    params = init_params(cfg, jax.random.PRNGKey(0))

    def temp_and_grads():
        grad = jax.jit(jax.grad(lambda p: _forward_sums(model.apply, p, batch, 0.0)[0]))
        return (grad.lower(params).compile().memory_analysis().temp_size_in_bytes,
                grad(params)["embed_tokens"]["embedding"])

    temp, grad = temp_and_grads()
    monkeypatch.setattr(llama, "embedding_lookup", lambda table, i: jnp.take(table, i, axis=0))
    temp_autodiff, grad_autodiff = temp_and_grads()
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_autodiff), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(grad[:64]).max()) > 0 and float(jnp.abs(grad[64:]).max()) == 0
    embedding_bytes = cfg.vocab_size * cfg.hidden_size * 4
    assert temp < temp_autodiff - 0.5 * embedding_bytes, (temp, temp_autodiff)


def _adamw_case(cfg, B, S, seed, param_seed):
    """(batch, model, train step function with the project's AdamW, fresh-state factory)."""
    batch = jax.tree.map(jnp.asarray, _batch(np.random.default_rng(seed), B, S))
    model = LlamaForCausalLM(cfg)
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0), 10,
                         init_params(cfg, jax.random.PRNGKey(param_seed)))

    def state():
        params = init_params(cfg, jax.random.PRNGKey(param_seed))
        return TrainState(step=jnp.int32(0), params=params, opt_state=opt.init(params),
                          rng=jax.random.PRNGKey(0))

    return batch, model, make_train_step(model.apply, opt), state


@pytest.mark.parametrize("tied", [False, True])
def test_logits_workspace_step_equals_the_plain_step_and_keeps_the_logits_out_of_temporaries(tied):
    # With a donated workspace the step writes the [B*S, V] logits (and their gradient, in
    # place) into the workspace's buffer, which it returns, instead of into its temporaries.
    from gorilla_jax.train.workspace import JittedTrainStep, logits_workspace

    cfg = dataclasses.replace(TINY, vocab_size=4096, tie_word_embeddings=tied)
    B, S = 8, 64  # the [512, 4096] logits (8 MiB) dwarf the rest of the step's temporaries
    batch, model, fn, state = _adamw_case(cfg, B, S, seed=7, param_seed=1)
    plain = JittedTrainStep(fn)
    with_ws = JittedTrainStep(fn, logits_workspace(B, S, cfg.vocab_size, jnp.float32),
                              keep_residuals=False)
    logits_bytes = B * S * cfg.vocab_size * 4
    m_plain = plain.lower(state(), batch).compile().memory_analysis()
    m_ws = with_ws.lower(state(), batch).compile().memory_analysis()
    # no [B*S, V] array is left among the temporaries (the others reuse some of its room)
    assert m_ws.temp_size_in_bytes < logits_bytes <= m_plain.temp_size_in_bytes
    assert m_plain.temp_size_in_bytes - m_ws.temp_size_in_bytes > 0.9 * logits_bytes
    assert m_ws.alias_size_in_bytes - m_plain.alias_size_in_bytes == logits_bytes  # reused in place

    s1, s2 = state(), state()
    for _ in range(2):
        logits = model.apply({"params": s1.params}, batch["input_ids"],
                             positions=batch["positions"], segment_ids=batch["segment_ids"])
        s1, m1 = plain(s1, batch)
        s2, m2 = with_ws(s2, batch)
        assert float(m1["loss"]) == float(m2["loss"])
        assert float(m1["grad_norm"]) == float(m2["grad_norm"])
        for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # the workspace holds what the head-gradient products read: exp(logits - row max)
        # with the row's sum of those taken off at the target (train/step.py _exp_once_grads)
        e = np.exp(np.asarray(logits, np.float64)
                   - np.asarray(logits, np.float64).max(-1, keepdims=True)).reshape(B * S, -1)
        u = e - e.sum(-1, keepdims=True) * np.eye(cfg.vocab_size)[np.asarray(batch["targets"]).reshape(-1)]
        np.testing.assert_allclose(np.asarray(with_ws.workspace), u, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_step_workspace_takes_the_residuals_and_the_embedding_gradient_out_of_temporaries(tied):
    # On one device the workspace also holds the arrays the backward reads and the embedding
    # table's gradient; XLA computes them in the workspace's buffers, and the steps are the same
    from gorilla_jax.train.workspace import (RESIDUAL_MIN_BYTES, JittedTrainStep,
                                             keeps_residuals, logits_workspace)

    cfg = dataclasses.replace(TINY, vocab_size=4096, hidden_size=128, intermediate_size=256,
                              tie_word_embeddings=tied)
    B, S = 8, 64  # [512, 128] activations: 256 KiB each, as large as a kept residual must be
    batch, model, fn, state = _adamw_case(cfg, B, S, seed=5, param_seed=2)
    ws = logits_workspace(B, S, cfg.vocab_size, jnp.float32)
    assert keeps_residuals(ws)
    steps = [JittedTrainStep(fn), JittedTrainStep(fn, ws, keep_residuals=False),
             JittedTrainStep(fn, logits_workspace(B, S, cfg.vocab_size, jnp.float32))]
    _, logits_only, full = (s.lower(state(), batch).compile().memory_analysis() for s in steps)
    kept = steps[2].workspace
    assert set(kept) == {"logits", "residuals", "embed_grad"}
    residuals = kept["residuals"]
    assert len(residuals) > 10
    assert all(x.nbytes >= RESIDUAL_MIN_BYTES for x in residuals)
    table = cfg.vocab_size * cfg.hidden_size * 4
    # every array the workspace gained is written in place, and leaves the temporaries
    assert (full.alias_size_in_bytes - logits_only.alias_size_in_bytes
            == sum(x.nbytes for x in residuals) + table)
    assert full.temp_size_in_bytes < logits_only.temp_size_in_bytes - table

    # the same steps; the workspace holds the first step's head and embedding gradients
    params0 = state().params

    def ce_sum(p):
        logits = model.apply({"params": p}, batch["input_ids"], positions=batch["positions"],
                             segment_ids=batch["segment_ids"])
        return token_loss_sums(logits, batch["targets"], batch["loss_mask"])[0]

    want = jax.grad(ce_sum)(params0)
    states = [state() for _ in steps]
    for i in range(2):
        outs = [s(st, batch) for s, st in zip(steps, states)]
        states = [o[0] for o in outs]
        for _, m in outs[1:]:
            assert float(m["loss"]) == float(outs[0][1]["loss"])
            assert float(m["grad_norm"]) == float(outs[0][1]["grad_norm"])
        for other in states[1:]:
            for a, b in zip(jax.tree.leaves(states[0].params), jax.tree.leaves(other.params)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if i == 0:
            full_ws = steps[2].workspace
            np.testing.assert_allclose(np.asarray(full_ws["embed_grad"]),
                                       np.asarray(want["embed_tokens"]["embedding"]),
                                       rtol=1e-4, atol=1e-5)
            if not tied:  # the fused head computes d_head in the forward: a residual
                d_head = [x for x in full_ws["residuals"] if x.shape == (128, cfg.vocab_size)]
                assert len(d_head) == 1
                np.testing.assert_allclose(np.asarray(d_head[0]),
                                           np.asarray(want["lm_head"]["kernel"]),
                                           rtol=1e-4, atol=1e-5)


def test_a_workspace_sharded_over_devices_keeps_the_logits_alone():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from gorilla_jax.train.workspace import JittedTrainStep, keeps_residuals, logits_workspace

    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    ws = logits_workspace(4, 16, 97, jnp.float32, NamedSharding(mesh, P("data", None)))
    assert not keeps_residuals(ws) and not keeps_residuals(None)
    step = JittedTrainStep(lambda state, batch, w: (state, {}, w), ws)
    assert step.workspace is ws  # an array, not extended


@pytest.mark.parametrize("tied", [False, True])
def test_donated_step_copies_no_parameter(tied):
    # the step updates the donated state in place; a read of a parameter that the update does
    # not wait for (the head's target-vector gather, once) made XLA copy that parameter at the
    # start of every step
    import re

    from gorilla_jax.train.workspace import JittedTrainStep, logits_workspace

    cfg = dataclasses.replace(TINY, vocab_size=4096, tie_word_embeddings=tied)
    B, S = 8, 64
    batch = jax.tree.map(jnp.asarray, _batch(np.random.default_rng(7), B, S))
    params = init_params(cfg, jax.random.PRNGKey(1))
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0), 10, params)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=opt.init(params),
                       rng=jax.random.PRNGKey(0))
    fn = make_train_step(LlamaForCausalLM(cfg).apply, opt)
    ws = lambda: logits_workspace(B, S, 4096, jnp.float32)  # noqa: E731
    for step in (JittedTrainStep(fn), JittedTrainStep(fn, ws(), keep_residuals=False),
                 JittedTrainStep(fn, ws())):
        hlo = step.lower(state, batch).compile().as_text()
        entry = hlo[hlo.index("\nENTRY"):]
        # the arrays among the parameters (scalars such as the step counter are copied freely)
        dims = {name: d for name, d in re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]\S* parameter\(",
                                                  entry) if d}
        copied = set(re.findall(r"= \S+ copy\(%([\w.\-]+)\)", entry)) & set(dims)
        assert len(dims) > 20
        if isinstance(step.workspace, dict):
            # With the residuals returned, XLA computes some of them a second time in fusions
            # of their own, which it schedules late; those that read a norm scale then come
            # after its in-place update, so the [D] scales are copied. Nothing larger is.
            assert all("layernorm" in name and "," not in dims[name] for name in copied), copied
        else:
            assert not copied, sorted(copied)


def test_logits_workspace_is_checked_and_used_only_where_it_helps():
    from gorilla_jax.train.workspace import logits_workspace, uses_logits_workspace

    assert uses_logits_workspace(1, "cpu") and not uses_logits_workspace(2, "cpu")
    assert not uses_logits_workspace(1, "cpu", "bfloat16")
    assert not uses_logits_workspace(1, "tpu") and not uses_logits_workspace(1, "gpu")
    batch = jax.tree.map(jnp.asarray, _batch(np.random.default_rng(7), 4, 16))
    model = LlamaForCausalLM(TINY)
    params = init_params(TINY, jax.random.PRNGKey(1))
    opt = optax.sgd(0.1)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=opt.init(params),
                       rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"float32\[64, 97\]"):  # rows of another batch size
        make_train_step(model.apply, opt)(state, batch, logits_workspace(2, 16, 97, jnp.float32))
    with pytest.raises(ValueError, match="micro_batches = 1, not 2"):
        make_train_step(model.apply, opt, micro_batches=2)(
            state, batch, logits_workspace(4, 16, 97, jnp.float32))
