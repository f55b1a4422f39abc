"""The training loop on the embedded data: sharding layouts, multi-process, resume, failures.

All runs use a small LLaMA (2 layers, hidden 64) and one sentencepiece tokenizer trained once.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gorilla_jax.config import load_config
from gorilla_jax.train.checkpoints import RunCheckpointer
from gorilla_jax.train.data import make_data_factory, resolve_tokenizer
from gorilla_jax.train.loop import TrainingDiverged, train

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.vocab_size=512",
         "data.seq_len=256", "train.global_batch_size=8", "train.log_every=1",
         "train.tensorboard=false", "optimizer.warmup_steps=2", "optimizer.learning_rate=3e-3"]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """One 512-piece tokenizer trained on the embedded data, shared by every run here."""
    run = tmp_path_factory.mktemp("tok_run")
    cfg = load_config("tiny", SMALL + [f"train.run_dir={run}"])
    resolve_tokenizer(cfg)
    return run / "tokenizer"


def _cfg(run_dir, tok_dir, *extra):
    return load_config("tiny", SMALL + [f"train.run_dir={run_dir}", f"data.tokenizer={tok_dir}", *extra])


def _train(cfg, stop_at=None):
    tok = resolve_tokenizer(cfg)
    factory, eval_batches = make_data_factory(cfg, tok)
    return train(cfg, factory, eval_batches=eval_batches, progress=False, stop_at=stop_at)


def _losses(run_dir):
    rows = [json.loads(l) for l in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _cli(args, env_extra=None, **kw):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "gorilla_jax", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_mesh_2x2x2_matches_one_device_and_shards_as_the_rules_say(tmp_path, tok_dir):
    steps = ["train.steps=10", "train.checkpoint_every=100"]
    sharded = _train(_cfg(tmp_path / "a", tok_dir, *steps, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    single = load_config("tiny", SMALL + [f"train.run_dir={tmp_path / 'b'}", f"data.tokenizer={tok_dir}", *steps,
                                          "mesh.data=1"])
    # One device: a mesh of size 1 on a single device.
    from gorilla_jax import sharding

    orig = sharding.make_mesh
    sharding.make_mesh = lambda mesh_cfg, devices=None: orig(mesh_cfg, jax.devices()[:1])
    try:
        one = _train(single)
    finally:
        sharding.make_mesh = orig
    a = np.array([l for _, l in sharded.losses])
    b = np.array([l for _, l in one.losses])
    assert len(a) == len(b) == 10
    np.testing.assert_allclose(a, b, rtol=2e-5)
    assert a[-1] < a[0] - 0.5
    p = sharded.state.params
    q = p["layers_0"]["self_attn"]["q_proj"]["kernel"]  # [embed, heads, head_dim]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    down = p["layers_1"]["mlp"]["down_proj"]["kernel"]  # [mlp, embed]
    assert down.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    emb = p["embed_tokens"]["embedding"]  # [vocab, embed]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert p["norm"]["scale"].sharding.spec == jax.sharding.PartitionSpec()
    mu = sharded.state.opt_state[1][0].mu["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert mu.sharding.spec == q.sharding.spec  # optimizer state sharded like its parameter


def test_resume_gives_identical_losses_and_reshards(tmp_path, tok_dir):
    full = _train(_cfg(tmp_path / "full", tok_dir, "train.steps=20", "train.checkpoint_every=10"))
    part = tmp_path / "part"
    first = _train(_cfg(part, tok_dir, "train.steps=20", "train.checkpoint_every=7"), stop_at=10)
    assert first.final_step == 10 and first.last_checkpoint == 10 and first.status == "stopped"
    # Resume on another layout of the mesh (data=2, fsdp=4): the state is resharded on restore.
    resumed = _train(_cfg(part, tok_dir, "train.steps=20", "train.checkpoint_every=7",
                          "mesh.data=2", "mesh.fsdp=4"))
    assert resumed.start_step == 10 and resumed.final_step == 20
    want = dict(full.losses)
    got = {**dict(first.losses), **dict(resumed.losses)}
    assert sorted(got) == list(range(1, 21))
    np.testing.assert_allclose([got[s] for s in range(1, 21)], [want[s] for s in range(1, 21)], rtol=2e-5)
    # metrics.jsonl continues across the resume.
    assert sorted(_losses(part)) == list(range(1, 21))
    assert RunCheckpointer(part).all_steps() == [14, 20]  # tiny.yaml keeps the last 2


def test_restore_on_fewer_devices(tmp_path, tok_dir):
    run = tmp_path / "run"
    _train(_cfg(run, tok_dir, "train.steps=6", "train.checkpoint_every=4"), stop_at=4)
    proc = _cli(["train", "--config", "tiny", *SMALL, f"train.run_dir={run}", f"data.tokenizer={tok_dir}",
                 "train.steps=6", "train.checkpoint_every=6", "mesh.fsdp=-1", "mesh.data=1", "--no-progress"],
                env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    assert "completed: steps 4->6" in out
    assert sorted(_losses(run)) == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tok_dir):
    run = tmp_path / "nan"
    cfg = _cfg(run, tok_dir, "train.steps=8", "train.checkpoint_every=1", "optimizer.learning_rate=1e30",
               "optimizer.warmup_steps=0", "optimizer.grad_clip=0", "train.async_checkpoint=false")
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step (\d+); stopping") as e:
        _train(cfg)
    bad_step = int(str(e.value).split(" at step ")[1].split(";")[0])
    steps = RunCheckpointer(run).all_steps()
    assert steps and max(steps) == bad_step - 1
    assert f"last good checkpoint is step {bad_step - 1}" in str(e.value)


def _wait_for(pred, timeout, proc):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tok_dir):
    run = tmp_path / "term"
    proc = _cli(["train", "--config", "tiny", *SMALL, f"train.run_dir={run}", f"data.tokenizer={tok_dir}",
                 "train.steps=100000", "train.checkpoint_every=100000", "--no-progress"])
    metrics = run / "metrics.jsonl"
    assert _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 300, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out  # EX_TEMPFAIL: resumable
    assert "preempted" in out
    steps = RunCheckpointer(run).all_steps()
    assert len(steps) == 1 and steps[0] == max(_losses(run))


def test_kill_9_during_async_save_leaves_previous_checkpoint_restorable(tmp_path, tok_dir):
    run = tmp_path / "kill"
    proc = _cli(["train", "--config", "tiny", *SMALL, f"train.run_dir={run}", f"data.tokenizer={tok_dir}",
                 "train.steps=100000", "train.checkpoint_every=1", "train.keep_checkpoints=100", "--no-progress"])
    ckpts = run / "checkpoints"

    def saving_after_a_complete_one():
        if not ckpts.is_dir():
            return False
        names = os.listdir(ckpts)
        return any(n.isdigit() for n in names) and any("tmp" in n for n in names)

    caught = _wait_for(saving_after_a_complete_one, 300, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert caught, "never saw a save in flight"
    leftovers = [n for n in os.listdir(ckpts) if not n.isdigit()]
    complete = RunCheckpointer(run).latest_step()
    assert complete is not None and all("tmp" in n for n in leftovers)
    # Resume: starts after the latest complete step, cleans the partial one, finishes.
    cfg = _cfg(run, tok_dir, f"train.steps={complete + 2}", "train.checkpoint_every=1")
    result = _train(cfg)
    assert result.start_step == complete and result.final_step == complete + 2
    assert not [n for n in os.listdir(ckpts) if "tmp" in n]


def test_tiny_model_learns_the_embedded_data(tmp_path, tok_dir):
    result = _train(_cfg(tmp_path / "learn", tok_dir, "train.steps=60", "train.checkpoint_every=1000",
                         "data.eval_fraction=0.1", "train.eval_every=60"))
    first, last = result.losses[0][1], result.losses[-1][1]
    assert first > 5.5  # ~ln(512) at random init
    assert last < 4.0, result.losses[-5:]
    (step, ev), = result.eval_losses
    assert step == 60 and ev < 4.5


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_match_one_process_with_eight_devices(tmp_path, tok_dir):
    common = ["train.steps=6", "train.checkpoint_every=6", "mesh.data=2", "mesh.fsdp=4"]
    one = _train(_cfg(tmp_path / "one", tok_dir, *common))
    run = tmp_path / "two"
    port = _free_port()
    procs = [_cli(["train", "--config", "tiny", *SMALL, f"train.run_dir={run}", f"data.tokenizer={tok_dir}",
                   *common, "--no-progress", "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", "2", "--process-id", str(i)],
                  env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}) for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    got = _losses(run)  # written by process 0 only
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [l for _, l in one.losses], rtol=2e-5)
    assert RunCheckpointer(run).all_steps() == [6]


def test_metrics_are_read_one_step_late_and_nan_still_stops_before_a_save(tmp_path, tok_dir,
                                                                          monkeypatch):
    """Step k's metrics are fetched after step k+1's batch is built and dispatched (the host
    does not wait for the device), except at checkpoint steps, read before saving: a NaN loss
    between checkpoints still stops the run with only good checkpoints on disk."""
    import gorilla_jax.train.loop as loop_mod
    from gorilla_jax.train import metrics as metrics_lib

    events = []
    build = loop_mod.global_batch
    monkeypatch.setattr(loop_mod, "global_batch",
                        lambda *a, **k: (events.append("batch"), build(*a, **k))[1])
    write = metrics_lib.MetricWriter.write
    monkeypatch.setattr(metrics_lib.MetricWriter, "write",
                        lambda self, step, row: (events.append(step), write(self, step, row))[1])
    run = tmp_path / "late"
    _train(_cfg(run, tok_dir, "train.steps=6", "train.checkpoint_every=3",
                "train.async_checkpoint=false", "train.async_metrics=true"))
    assert events == ["batch", "batch", 1, "batch", 2, 3, "batch", "batch", 4, "batch", 5, 6]
    assert len(_losses(run)) == 6
    events.clear()  # the CPU default reads every step's metrics before building the next batch
    _train(_cfg(tmp_path / "sync", tok_dir, "train.steps=3", "train.async_metrics=false"))
    assert events == ["batch", 1, "batch", 2, "batch", 3]

    run = tmp_path / "nan_late"
    cfg = _cfg(run, tok_dir, "train.steps=12", "train.checkpoint_every=3", "optimizer.learning_rate=1e30",
               "optimizer.warmup_steps=0", "optimizer.grad_clip=0", "train.async_checkpoint=false",
               "train.async_metrics=true")
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step (\d+); stopping") as e:
        _train(cfg)
    bad_step = int(str(e.value).split(" at step ")[1].split(";")[0])
    assert bad_step > 1
    good = [s for s in range(3, 13, 3) if s < bad_step]
    assert RunCheckpointer(run).all_steps() == good
    assert sorted(_losses(run)) == list(range(1, bad_step))
