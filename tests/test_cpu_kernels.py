"""The native CPU kernel (gorilla_jax/cpu_kernels): build, AdamW in place, and the train step
with it against the step with XLA's loops."""
import stat

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from gorilla_jax import cpu_kernels, sharding
from gorilla_jax.config import OptimizerConfig
from gorilla_jax.model import LlamaForCausalLM, init_params
from gorilla_jax.train.optimizer import make_in_place_update, make_optimizer
from gorilla_jax.train.step import TrainState, make_train_step
from test_train_step import TINY, _batch


@pytest.fixture
def one_cpu():
    """A one-device mesh: the tests run with 8 host devices, where the kernel stays off."""
    with sharding.activate(Mesh(np.array(jax.devices()[:1]), ("data",))):
        yield


def test_library_builds_loads_and_registers(tmp_path):
    assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
    assert cpu_kernels.unavailable_reason() is None
    cxx = cpu_kernels.compiler()
    path = cpu_kernels.library_path(cxx)
    assert path.exists() and path.parent == cpu_kernels.cache_dir()
    # the same key for the same source, compiler and CPU; a fresh build elsewhere has the symbols
    assert cpu_kernels.library_path(cxx) == path
    out = cpu_kernels.build(cxx, tmp_path / "k.so")
    import ctypes

    lib = ctypes.CDLL(str(out))
    assert all(hasattr(lib, sym) for sym in cpu_kernels.TARGETS.values())
    assert [p.name for p in tmp_path.iterdir()] == ["k.so"]


def test_failed_build_names_the_command_and_leaves_nothing(tmp_path):
    fake = tmp_path / "bin" / "fakecxx"
    fake.parent.mkdir()
    # writes a partial output, as a compiler killed half-way would, then fails
    fake.write_text('#!/bin/sh\nfor a; do out="$a"; done\necho partial > "$out"\n'
                    'echo "kernels.cc:1: error: broken" >&2\nexit 3\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    dest = tmp_path / "cache" / "k.so"
    with pytest.raises(RuntimeError, match=r"fakecxx .*kernels\.cc.* failed \(3\):\n.*error: broken"):
        cpu_kernels.build(str(fake), dest)
    assert list(dest.parent.iterdir()) == []


def test_no_compiler_turns_the_kernel_off(monkeypatch, one_cpu):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.compiler() is None
    assert not cpu_kernels.usable()
    assert "no C++ compiler" in cpu_kernels.unavailable_reason()


def test_usable_only_on_one_cpu_device(monkeypatch, one_cpu):
    assert cpu_kernels.usable()
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_kernels.usable()
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    with sharding.activate(Mesh(np.array(jax.devices()), ("data",))):
        assert not cpu_kernels.usable()  # 8 devices: XLA's partitioned loops


def _tree(rng):
    # sizes across several 32768-element chunks with a tail, and a tiny one
    return {"embed_tokens": {"embedding": rng.normal(size=(301, 257)).astype(np.float32)},
            "layers_0": {"q_proj": {"kernel": rng.normal(size=(70001,)).astype(np.float32)},
                         "input_layernorm": {"scale": np.ones(7, np.float32)}}}


@pytest.mark.parametrize("clip", [0.5, 1e6, 0.0])
def test_adamw_in_place_matches_optax(one_cpu, clip):
    rng = np.random.default_rng(0)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    cfg = OptimizerConfig(learning_rate=3e-3, schedule="cosine", warmup_steps=2, b1=0.9,
                          b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=clip,
                          weight_decay_exclude=["norm", "embed_tokens"])
    opt = make_optimizer(cfg, 20, params)
    in_place = make_in_place_update(cfg, 20, params)

    @jax.jit
    def reference(p, s, sums, scale):
        g = jax.tree.map(lambda x: x * scale, sums)
        u, s = optax.with_extra_args_support(opt).update(g, s, p, grad_norm=optax.global_norm(g))
        return optax.apply_updates(p, u), s

    @jax.jit
    def native(p, s, sums, scale):
        return in_place(p, sums, scale, optax.global_norm(sums) * scale, s)

    hlo = native.lower(params, opt.init(params), params, jnp.float32(1)).as_text()
    assert hlo.count("@gorilla_adamw_in_place(") == 3  # one call per parameter
    p_ref, s_ref = params, opt.init(params)
    p_nat, s_nat = params, opt.init(params)
    for step in range(4):
        sums = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 40, jnp.float32),
                            params)
        scale = jnp.float32(1 / (step + 3))
        p_ref, s_ref = reference(p_ref, s_ref, sums, scale)
        p_nat, s_nat = native(p_nat, s_nat, sums, scale)
    assert jax.tree.structure(s_nat) == jax.tree.structure(s_ref)
    # rounding-level differences: XLA contracts multiply-adds into FMAs, the kernel does not
    for a, b in zip(jax.tree.leaves((p_nat, s_nat)), jax.tree.leaves((p_ref, s_ref))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert int(s_nat[-1][0].count) == 4 and int(s_nat[-1][2].count) == 4
    moved = np.asarray(p_nat["layers_0"]["q_proj"]["kernel"]) != np.asarray(
        params["layers_0"]["q_proj"]["kernel"])
    assert moved.all()  # every chunk, the tail included


def test_in_place_update_declines_off_one_cpu_device_for_bfloat16_and_other_states(one_cpu):
    params = {"w": jnp.ones((5,), jnp.float32)}
    cfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=0)
    update = make_in_place_update(cfg, 10, params)
    state = make_optimizer(cfg, 10, params).init(params)
    assert update(params, params, 1.0, jnp.float32(1), state) is not None
    half = {"w": jnp.ones((5,), jnp.bfloat16)}
    assert update(half, half, 1.0, jnp.float32(1), state) is None
    with sharding.activate(Mesh(np.array(jax.devices()), ("data",))):
        assert update(params, params, 1.0, jnp.float32(1), state) is None
    sgd_state = optax.sgd(0.1).init(params)  # another optimizer's state
    assert update(params, params, 1.0, jnp.float32(1), sgd_state) is None


def _train(steps, monkeypatch, kernel: bool):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1" if kernel else "0")
    model = LlamaForCausalLM(TINY)
    params = init_params(TINY, jax.random.PRNGKey(1))
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, weight_decay=0.1, grad_clip=0.5,
                          z_loss=1e-4)
    opt = make_optimizer(cfg, 10, params)
    step = jax.jit(make_train_step(model.apply, opt, z_loss=cfg.z_loss,
                                   in_place_update=make_in_place_update(cfg, 10, params)),
                   donate_argnums=(0,))
    state = TrainState(step=jnp.int32(0), params=params, opt_state=opt.init(params),
                       rng=jax.random.PRNGKey(0))
    rng = np.random.default_rng(7)
    batches = [jax.tree.map(jnp.asarray, _batch(rng, 4, 16))] * steps  # one batch: it is learnt
    hlo = step.lower(state, batches[0]).as_text()
    losses = []
    for b in batches:
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    return state, losses, hlo


def test_train_step_with_the_kernel_matches_xla_loops(one_cpu, monkeypatch):
    s_nat, l_nat, hlo_nat = _train(3, monkeypatch, kernel=True)
    s_xla, l_xla, hlo_xla = _train(3, monkeypatch, kernel=False)
    n_params = len(jax.tree.leaves(s_nat.params))
    assert hlo_nat.count("@gorilla_adamw_in_place(") == n_params
    assert "@gorilla_" not in hlo_xla
    np.testing.assert_allclose(l_nat, l_xla, rtol=1e-5)
    assert l_nat[2] < l_nat[0]
    for a, b in zip(jax.tree.leaves(s_nat), jax.tree.leaves(s_xla)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
