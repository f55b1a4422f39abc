"""The tf.data pipeline: determinism, epochs, host sharding (in-process and 2 processes), resume."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import packing
from data_pipeline.pipeline import PackedPipeline, Position
from gorilla_jax.errors import GorillaError
from gorilla_jax.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from multihost_pipeline_worker import build as build_worker_pipeline  # noqa: E402
from multihost_pipeline_worker import synthetic_pairs  # noqa: E402

WORKER = Path(__file__).parent / "multihost_pipeline_worker.py"


@pytest.fixture(scope="module")
def tok():
    import mistral_common

    return load_tokenizer(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")


def make(tok, n=60, **kw):
    args = dict(seq_len=80, global_batch_size=4, seed=3, num_epochs=3, include_example_ids=True,
                process_index=0, process_count=1, progress=False,
                chunk_tokens=3 * 4 * 80)  # tf.data fills 3 batches per call: chunk edges get tested
    args.update(kw)
    return PackedPipeline(synthetic_pairs(n), tok, **args)


def take(it, n):
    return [next(it) for _ in range(n)]


def ids_of(batch):
    """Example ids present in a batch, one entry per segment."""
    out = []
    for b in range(batch["segment_ids"].shape[0]):
        out += [int(p["example_ids"][0]) for p in packing.unpack_row(batch, b)]
    return out


def test_batches_shapes_epochs_and_coverage(tok):
    pipe = make(tok)
    batches = list(pipe.iterator())
    steps = [pipe.steps_per_epoch(e) for e in range(3)]
    assert len(batches) == sum(steps)
    for b in batches:
        assert set(b) == set(packing.FIELDS) | {"example_ids"}
        assert all(v.shape == (4, 80) for v in b.values())
        assert b["input_ids"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    # every example exactly once per epoch
    first = 0
    orders = []
    for e, n in enumerate(steps):
        seen = [i for b in batches[first:first + n] for i in ids_of(b)]
        assert sorted(seen) == list(range(60)), f"epoch {e}"
        orders.append(seen)
        first += n
    assert orders[0] != orders[1] != orders[2]  # reshuffled each epoch
    stats = pipe.stats(0)
    assert stats.examples == 60 and stats.dropped == 0
    assert stats.tokens == sum(int((b["segment_ids"] > 0).sum()) for b in batches[:steps[0]])
    assert stats.slots == steps[0] * 4 * 80


def test_deterministic_by_seed(tok):
    a = list(make(tok, num_epochs=1).iterator())
    b = list(make(tok, num_epochs=1).iterator())
    c = list(make(tok, num_epochs=1, seed=4).iterator())
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert len(a) == len(b)
    assert any(not np.array_equal(x["example_ids"], y["example_ids"]) for x, y in zip(a, c))
    plain = list(make(tok, num_epochs=1, shuffle=False).iterator())
    assert ids_of(plain[0])[:3] == [0, 1, 2]


def test_host_shards_are_disjoint_and_form_the_global_batch(tok):
    whole = make(tok, global_batch_size=8)
    hosts = [make(tok, global_batch_size=8, process_index=i, process_count=4) for i in range(4)]
    assert [h.host_batch_size for h in hosts] == [2, 2, 2, 2]
    its = [h.iterator() for h in hosts]
    for g in whole.iterator():
        parts = [next(it) for it in its]
        for k in g:
            assert np.array_equal(np.concatenate([p[k] for p in parts]), g[k])
        sets = [set(ids_of(p)) for p in parts]
        assert sum(len(s) for s in sets) == len(set().union(*sets))
    for it in its:
        with pytest.raises(StopIteration):
            next(it)


def test_resume_sees_exactly_the_uninterrupted_batches(tok):
    pipe = make(tok)
    total = pipe.steps_per_epoch(0) + pipe.steps_per_epoch(1) + 2
    straight = take(pipe.iterator(), total)
    for cut in (0, 3, pipe.steps_per_epoch(0) - 1, pipe.steps_per_epoch(0) + 1):
        it = make(tok).iterator()
        take(it, cut)
        saved = json.loads(json.dumps(it.position()))  # as a checkpoint stores it
        resumed = take(make(tok).iterator(saved), total - cut)
        for x, y in zip(straight[cut:], resumed):
            for k in x:
                assert np.array_equal(x[k], y[k]), (cut, k)
    # the position at the end of an epoch is the start of the next one
    it = make(tok).iterator()
    take(it, pipe.steps_per_epoch(0))
    assert it.position() == {"epoch": 1, "step": 0}
    # resuming on a different number of hosts continues the same global batches
    it = make(tok).iterator()
    take(it, 5)
    two = [make(tok, process_index=i, process_count=2).iterator(it.position()) for i in range(2)]
    nxt = next(it)
    assert np.array_equal(np.concatenate([next(t)["input_ids"] for t in two]), nxt["input_ids"])


def test_pipeline_runs_without_tf_data_autotuning(tok):
    # With tf.data's autotuning on, deleting an iterator waited (holding the GIL) for the
    # autotuning thread's next wake-up: up to tens of seconds for a long-lived training
    # iterator (the end of `gorilla-jax run`'s training stalled 24-27 s). The pipeline turns
    # autotuning off, for training and evaluation alike.
    for pipe in (make(tok, num_epochs=None), make(tok, shuffle=False, num_epochs=1)):
        assert pipe.dataset(Position(0, 0)).options().autotune.enabled is False


def test_epoch_dependent_source(tok):
    """A source function is called per epoch (e.g. retrieval modes redrawn each epoch)."""
    calls = []

    def source(epoch):
        calls.append(epoch)
        return [(p + f"epoch {epoch} ", r) for p, r in synthetic_pairs(20)]

    pipe = PackedPipeline(source, tok, seq_len=80, global_batch_size=2, num_epochs=2,
                          process_index=0, process_count=1, progress=False)
    batches = list(pipe.iterator())
    assert sorted(set(calls)) == [0, 1]
    text0 = tok.decode(batches[0]["input_ids"][0])
    text1 = tok.decode(batches[-1]["input_ids"][0])
    assert "epoch 0" in text0 and "epoch 1" not in text0 and "epoch 1" in text1


def test_bad_inputs(tok):
    with pytest.raises(GorillaError, match="global_batch_size"):
        make(tok, global_batch_size=6, process_count=4)
    with pytest.raises(GorillaError, match="no usable examples"):
        make(tok, n=5, seq_len=4, truncation="drop").steps_per_epoch(0)
    with pytest.raises(GorillaError, match="position"):
        Position.from_dict({"epoch": 1})
    with pytest.raises(GorillaError, match="position"):
        Position.from_dict({"epoch": -1, "step": 0})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_get_disjoint_shards_covering_each_epoch(tok, tmp_path):
    """Two jax.distributed processes on 127.0.0.1 each build the pipeline and read two epochs."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    for attempt in range(2):  # a port taken between choosing and binding: retry once
        port = _free_port()
        outs = [tmp_path / f"host{i}-{attempt}.json" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port), str(outs[i])],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(2)]
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=240)[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if all(p.returncode == 0 for p in procs):
            break
    else:
        pytest.fail("worker failed:\n" + "\n----\n".join(log[-3000:] for log in logs))

    results = [json.loads(o.read_text()) for o in outs]
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["process_count"] == 2 and r["host_batch_size"] == 2 for r in results)
    single = build_worker_pipeline(tok, process_index=0, process_count=1)
    reference = list(single.iterator())
    assert len(results[0]["batches"]) == len(results[1]["batches"]) == len(reference)
    first = 0
    for epoch in range(2):
        steps = single.steps_per_epoch(epoch)
        per_host = []
        for r in results:
            ids = set()
            for b in r["batches"][first:first + steps]:
                arr = np.asarray(b["example_ids"])
                ids |= set(arr[arr >= 0].tolist())
            per_host.append(ids)
        assert not per_host[0] & per_host[1]  # disjoint
        assert per_host[0] | per_host[1] == set(range(90))  # together: the whole epoch
        first += steps
    # host i holds rows [2i, 2i+2) of every global batch of the single-process run
    for k, ref in enumerate(reference):
        both = np.concatenate([np.asarray(r["batches"][k]["example_ids"]) for r in results])
        assert np.array_equal(both, ref["example_ids"])
        assert results[0]["batches"][k]["position"] == results[1]["batches"][k]["position"]


def test_build_from_config_on_the_embedded_sample(tok):
    """config -> examples -> retriever-aware texts -> tokens -> packed batches."""
    from data_pipeline import layout
    from data_pipeline.pipeline import TrainingData, build_eval_pipeline, build_train_pipeline
    from gorilla_jax.config import load_config

    cfg = load_config("tiny", ["data.retriever_probs={none: 0.4, oracle: 0.3, bm25: 0.3}",
                               "data.eval_fraction=0.1", "data.seq_len=512", "data.data_dir=null"])
    data = TrainingData(cfg, tok)
    n_files = {hub: sum(1 for line in open(layout.hub_files(hub, layout.SAMPLE_DIR).train) if line.strip())
               for hub in layout.HUBS}
    assert {h: s["parsed"] for h, s in data.parse_stats.items()} == n_files
    assert data.count("train") + data.count("eval") == sum(n_files.values())
    held = {ex.instruction for hub in layout.HUBS for ex in data.examples["eval"][hub]}
    assert held and not held & {ex.instruction for hub in layout.HUBS for ex in data.examples["train"][hub]}

    # retrieval modes are drawn per example and redrawn per epoch, all three in use
    e0, e1 = data.texts("train", 0), data.texts("train", 1)
    modes0 = [t.meta["retriever"] for t in e0]
    assert set(modes0) == {"none", "oracle", "bm25"}
    assert modes0 != [t.meta["retriever"] for t in e1]
    assert [t.meta["retriever"] for t in data.texts("train", 0)] == modes0  # seeded

    pipe = build_train_pipeline(cfg, tok, data=data, process_index=0, process_count=1,
                                num_epochs=1, include_example_ids=True)
    assert pipe.info["parse"] == data.parse_stats
    batches = list(pipe.iterator())
    assert all(b["input_ids"].shape == (cfg.train.global_batch_size, 512) for b in batches)
    stats = pipe.stats(0)
    assert stats.examples == data.count("train") and stats.dropped == 0
    assert stats.tokens == sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    part = packing.unpack_row(batches[0], 0)[0]
    text = e0[int(part["example_ids"][0])]
    assert tok.decode(part["input_ids"]).startswith("###USER: ")
    assert part["targets"][part["loss_mask"] == 1].tolist() == \
        tok.encode(text.response, add_bos=False, add_eos=False) + [tok.eos_id]

    ev = build_eval_pipeline(cfg, tok, data=data, process_index=0, process_count=1)
    assert ev.stats(0).examples == data.count("eval")
    assert sum(1 for _ in ev.iterator()) == ev.steps_per_epoch(0)
    assert build_eval_pipeline(load_config("tiny"), tok, process_index=0, process_count=1) is None

    with pytest.raises(GorillaError, match="data.hub"):
        build_train_pipeline(load_config("tiny", ["data.hub=custom"]), tok)
