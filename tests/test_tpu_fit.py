"""The TPU fit check: real ahead-of-time compiles for TPU topologies with libtpu (no TPU).

libtpu is a dependency of the test extra: if it is missing these tests fail (they do not skip).
"""
import json

import jax
import jax.numpy as jnp
import pytest

from gorilla_jax import cli
from gorilla_jax.config import load_config
from gorilla_jax.tpu import chips
from gorilla_jax.tpu.fit import fit_check, matmul_flops

GIB = 2 ** 30


def test_libtpu_is_installed():
    import libtpu  # noqa: F401  (a missing libtpu must fail loudly, not skip)

    from gorilla_jax.tpu.fit import topology_devices

    devices = topology_devices(chips.parse_topology("v4:2x2x2"))
    assert len(devices) == 8 and devices[0].device_kind == "TPU v4"  # megacore: 1 device/chip
    two = topology_devices(chips.parse_topology("v5e:2x2", num_slices=2))
    assert len(two) == 8 and sorted({d.slice_index for d in two}) == [0, 1]


@pytest.mark.parametrize("text, name, accel, n", [
    ("v5e:4x4", "v5e:4x4", "v5litepod-16", 16), ("v4-32", "v4:2x2x4", "v4-32", 16),
    ("v5litepod-16", "v5e:4x4", "v5litepod-16", 16), ("v5p:2x2x4", "v5p:2x2x4", "v5p-32", 16),
    ("v6e-64", "v6e:8x8", "v6e-64", 64),
])
def test_parse_topology(text, name, accel, n):
    t = chips.parse_topology(text)
    assert (t.name, t.accelerator_type, t.num_chips) == (name, accel, n)
    assert chips.parse_topology(text, num_slices=2).num_chips == 2 * n


@pytest.mark.parametrize("bad", ["v5e:4x4x4", "v9:2x2", "v4-30", "tpu", "v5e:0x4"])
def test_parse_topology_errors(bad):
    with pytest.raises(chips.TopologyError):
        chips.parse_topology(bad)


def test_parse_out_of_memory():
    from gorilla_jax.tpu.fit import parse_out_of_memory

    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (1.13T) exceeds available HBM (30.75G).")
    assert parse_out_of_memory(msg) == (int(1.13 * 2 ** 40), int(30.75 * GIB))
    assert parse_out_of_memory("INTERNAL: something else") is None


def test_matmul_flops_counts_loops():
    def f(x, ws):
        def body(h, w):
            return jnp.tanh(h @ w), None
        h, _ = jax.lax.scan(body, x, ws)
        return jax.lax.cond(h.sum() > 0, lambda a: a @ ws[0], lambda a: a, h)

    jaxpr = jax.make_jaxpr(f)(jnp.zeros((8, 16)), jnp.zeros((5, 16, 16)))
    # 5 scanned [8,16]x[16,16] products plus the costlier cond branch: 6 * 2*8*16*16
    assert matmul_flops(jaxpr) == 6 * 2 * 8 * 16 * 16


def test_tiny_fit_cli_json_does_not_fit(capsys):
    # 65536 sequences on 4 chips: the compiler itself refuses the program (out of HBM).
    rc = cli.main(["tpu", "fit", "--config", "tiny", "--topology", "v5e:2x2", "--json",
                   "train.global_batch_size=65536", "train.steps=1000"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["fits"] is False and out["compiled"] is False
    for key in ("hbm_bytes_per_chip", "hbm_capacity_bytes", "fits", "flops_per_step",
                "predicted_step_seconds", "predicted_mfu"):
        assert key in out
    # the limit libtpu's compiler names for v5e, and its total for this program
    assert out["hbm_capacity_bytes"] == int(15.75 * GIB) and out["hbm_nominal_bytes"] == 16 * GIB
    assert out["hbm_bytes_per_chip"] > 100 * GIB and out["num_chips"] == 4
    assert out["mesh"] == {"dcn_data": 1, "data": 4, "fsdp": 1, "tensor": 1}
    cfg = load_config("tiny")
    seq = cfg.data.seq_len
    # per chip: fp32 params + AdamW mu, nu (replicated on data=4) + a quarter of 5 int32 inputs
    from gorilla_jax.model import abstract_params, count_params

    n = count_params(abstract_params(cfg.model))
    assert out["argument_bytes"] == pytest.approx(12 * n + 5 * 65536 * seq * 4 // 4, rel=0.01)
    # Tiny: no remat, no scan: the executed matmuls are the model formula plus the product
    # that spreads RoPE's cos and sin ([2, tokens, Dh/2] x [Dh/2, Dh], layers.rope_cos_sin),
    # less the attention scores the causal query blocks skip (attention.dot_product_attention:
    # 4 blocks of 128 queries, each against the keys up to its end; the formula counts all
    # [S, S] scores: 12 FLOPs per score and attention dimension, forward and backward)
    from gorilla_jax.train.metrics import flops_per_step

    formula = flops_per_step(cfg.model, 65536, seq)
    m = cfg.model
    dh = m.resolved_head_dim
    rope = 2 * (2 * 65536 * seq) * (dh // 2) * dh
    assert seq == 512
    scored = sum(128 * end for end in (128, 256, 384, 512))  # 10/16 of seq * seq
    skipped = 12 * m.num_hidden_layers * m.num_attention_heads * dh * 65536 * (seq * seq - scored)
    program = formula + rope - skipped
    assert out["flops_per_step"] == formula
    assert out["program_flops_per_step"] == pytest.approx(program, rel=1e-9)
    assert out["predicted_step_seconds"] == pytest.approx(program / (4 * 197e12), rel=1e-9)
    assert out["predicted_mfu"] == pytest.approx(formula / program, rel=1e-9)
    assert out["chip_hours"] == pytest.approx(1000 * out["predicted_step_seconds"] * 4 / 3600)
    over = (out["hbm_bytes_per_chip"] - out["hbm_capacity_bytes"]) / GIB
    assert out["suggestions"][0].startswith(f"needs {over:.2f} GiB more than the 15.75 GiB")
    text = " | ".join(out["suggestions"])
    assert "train.micro_batches=2" in text and "model.remat=full" in text
    assert "mesh.fsdp=-1" not in text  # sharding 0.1 GiB of state cannot recover 240 GiB


def test_tiny_fits_and_xla_agrees_with_the_jaxpr_count():
    cfg = load_config("tiny", ["train.global_batch_size=8"])
    r = fit_check(cfg, "v5e:2x2")
    assert r.fits and r.compiled and 0 < r.hbm_bytes_per_chip < GIB
    assert r.suggestions == []
    assert r.allocation_sum_bytes == (r.argument_bytes + r.output_bytes - r.alias_bytes
                                      + r.temp_bytes + r.generated_code_bytes)
    # no loops in the tiny step: XLA's cost analysis agrees with the products counted from
    # the jaxpr within a few % (both below the formula: the causal query blocks skip scores)
    assert r.xla_cost_analysis_flops == pytest.approx(r.program_flops_per_step, rel=0.06)
    assert r.program_flops_per_step < 0.95 * r.flops_per_step


@pytest.mark.tpu_compile
def test_llama_7b_fits_v5e_4x4_at_batch_16():
    cfg = load_config("configs/gorilla_llama_7b.yaml",
                      ["train.global_batch_size=16", "train.micro_batches=1"])
    r = fit_check(cfg, "v5e:4x4")
    assert r.mesh == {"dcn_data": 1, "data": 1, "fsdp": 16, "tensor": 1}
    assert r.fits and r.compiled and 5 * GIB < r.hbm_bytes_per_chip < 16 * GIB
    assert r.hbm_bytes_per_chip <= r.allocation_sum_bytes  # the plan reuses dead buffers
    # fp32 params + AdamW mu and nu, sharded 16 ways, are most of the arguments
    n = 6_738_415_616
    assert r.argument_bytes == pytest.approx(12 * n / 16, rel=0.01)
    assert r.alias_bytes >= 0.99 * 12 * n / 16  # the donated state is updated in place
    # model formula (6 N_matmul + 12 L S d) B S, computed here from the shapes
    n_matmul = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000
    formula = (6 * n_matmul + 12 * 32 * 2048 * 4096) * 16 * 2048
    assert r.flops_per_step == formula
    # full remat recomputes each layer's forward except the last product (down_proj, whose
    # output no gradient needs): 5.40e10 executed vs 4.29e10 model FLOPs per token, less the
    # 6/16 of the [S, S] attention scores the 4 causal query blocks skip (16 FLOPs per score
    # and attention dimension: the forward twice, then the backward)
    skipped = 16 * 32 * 4096 * 16 * (2048 * 2048 * 6 // 16)
    assert 1.25 < (r.program_flops_per_step + skipped) / formula < 1.27
    # XLA's cost analysis counts the scanned layer body once: far below the real count
    assert r.xla_cost_analysis_flops < 0.25 * formula
    assert r.predicted_mfu == pytest.approx(formula / r.program_flops_per_step)
    assert r.tokens_per_second == pytest.approx(16 * 2048 / r.predicted_step_seconds)
