"""gorilla_jax.run_dir: a training run directory loads as a model (params of one checkpoint)."""
import dataclasses

import jax
import numpy as np
import pytest

from gorilla_jax.config import Config, dump_config
from gorilla_jax.errors import GorillaError
from gorilla_jax.loading import default_tokenizer_path, load_model, model_eos_ids
from gorilla_jax.model import init_params, stack_layers
from gorilla_jax.run_dir import (checkpoint_steps, is_run_dir, load_run_params, run_prompt_format,
                                 run_tokenizer_path)
from gorilla_jax.train.checkpoints import RunCheckpointer
from runner_helpers import TINY


def make_run(run_dir, scan: bool, steps=(3, 5), tokenizer=True):
    """A run directory as `gorilla-jax train` leaves it: config.yaml and Orbax checkpoints
    of {step, params, opt_state, rng}; each step's params differ."""
    model = dataclasses.replace(TINY, num_hidden_layers=2, scan_layers=scan)
    cfg = Config(model=model)
    cfg.train.run_dir = str(run_dir)
    cfg.data.prompt_format = "chat"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    plain = {}
    ckpt = RunCheckpointer(str(run_dir), keep=5, async_save=False)
    for step in steps:
        unscanned = jax.tree.map(np.asarray, init_params(dataclasses.replace(model, scan_layers=False),
                                                         jax.random.PRNGKey(step)))
        params = stack_layers(unscanned, 2) if scan else unscanned
        state = {"step": np.int32(step), "params": params,
                 "opt_state": {"mu": params, "count": np.int32(step)},
                 "rng": np.asarray(jax.random.PRNGKey(0))}
        ckpt.save(step, state, {"epoch": 0, "step": step}, cfg.to_dict(), force=True)
        plain[step] = unscanned
    ckpt.close()
    if tokenizer:
        (run_dir / "tokenizer").mkdir()
        (run_dir / "tokenizer" / "tokenizer.model").write_bytes(b"")
    return cfg, plain


@pytest.mark.parametrize("scan", [False, True])
def test_latest_checkpoint_params_load_unscanned(tmp_path, scan):
    cfg, plain = make_run(tmp_path / "run", scan)
    (tmp_path / "run" / "checkpoints" / "7.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save
    assert is_run_dir(tmp_path / "run") and checkpoint_steps(tmp_path / "run") == [3, 5]
    config, params = load_run_params(tmp_path / "run")
    assert not config.scan_layers and config.hidden_size == cfg.model.hidden_size
    assert jax.tree.structure(params) == jax.tree.structure(plain[5])
    jax.tree.map(np.testing.assert_array_equal, params, plain[5])
    # an earlier step on request, as bfloat16, and the scanned layout
    config, params = load_run_params(tmp_path / "run", step=3, dtype="bfloat16", scan_layers=True)
    assert config.param_dtype == "bfloat16" and config.scan_layers
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].dtype == np.dtype("bfloat16")
    np.testing.assert_allclose(np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"][1], np.float32),
                               plain[3]["layers_1"]["mlp"]["up_proj"]["kernel"], rtol=1e-2)
    with pytest.raises(GorillaError, match="no checkpoint of step 4"):
        load_run_params(tmp_path / "run", step=4)


def test_load_model_and_helpers_accept_a_run_dir(tmp_path):
    _, plain = make_run(tmp_path / "run", scan=False, steps=(2,))
    config, params = load_model(tmp_path / "run")
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], plain[2]["embed_tokens"]["embedding"])
    assert model_eos_ids(tmp_path / "run") == [2]
    assert default_tokenizer_path(tmp_path / "run") == tmp_path / "run" / "tokenizer" / "tokenizer.model"
    assert run_tokenizer_path(tmp_path / "run") == tmp_path / "run" / "tokenizer"
    assert run_prompt_format(tmp_path / "run") == "chat"


def test_runs_without_checkpoints_or_tokenizer(tmp_path):
    make_run(tmp_path / "run", scan=False, steps=(), tokenizer=False)
    assert checkpoint_steps(tmp_path / "run") == []
    assert run_tokenizer_path(tmp_path / "run") is None
    with pytest.raises(GorillaError, match="no complete checkpoint"):
        load_model(tmp_path / "run")
    with pytest.raises(GorillaError, match="not a training run directory"):
        load_run_params(tmp_path)


def test_relative_paths_save_and_load(tmp_path, monkeypatch):
    """Orbax rejects relative paths; runs and params checkpoints named relative to the working
    directory (`gorilla-jax run` writes runs/main) are made absolute for it."""
    from gorilla_jax.checkpoint import load_params, orbax_path, save_params

    monkeypatch.chdir(tmp_path)
    _, plain = make_run(tmp_path / "rel", scan=False, steps=(4,))
    config, params = load_run_params("rel")
    np.testing.assert_array_equal(params["norm"]["scale"], plain[4]["norm"]["scale"])
    ckpt = RunCheckpointer("rel2", keep=1, async_save=False)
    ckpt.save(1, {"params": plain[4]}, {"step": 1}, {}, force=True)
    ckpt.close()
    assert (tmp_path / "rel2" / "checkpoints" / "1").is_dir()
    save_params("params_out", plain[4], config)
    _, loaded = load_params("params_out")
    np.testing.assert_array_equal(loaded["layers_1"]["mlp"]["down_proj"]["kernel"],
                                  plain[4]["layers_1"]["mlp"]["down_proj"]["kernel"])
    assert orbax_path("gs://bucket/run") == "gs://bucket/run"
    assert orbax_path("a/b") == tmp_path / "a" / "b"
