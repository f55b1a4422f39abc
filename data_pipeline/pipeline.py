"""The training input pipeline on tf.data: shuffle, pack, host-shard, batch, prefetch, resume.

Every host computes the same global sequence of packed rows, which makes the data order
independent of how many hosts read it:

1. The (prompt, response) pairs of an epoch are tokenized once (:mod:`data_pipeline.packing`).
2. Epoch ``e`` permutes the examples with a generator seeded by ``(seed, e)`` and plans their
   greedy packing into rows of ``seq_len`` (cheap: lengths only); the rows form global batches
   of ``global_batch_size`` rows. A short last batch is filled with padding rows (no loss), so
   every example is seen exactly once per epoch.
3. Host ``i`` of ``n`` takes rows ``[i*h, (i+1)*h)`` of every global batch (``h = global/n``), so
   the hosts' shards are disjoint and together form the global batch, as
   ``jax.make_array_from_process_local_data`` expects. A host materialises only its own rows.
4. tf.data streams the host's batches epoch after epoch (``flat_map`` over epochs; a
   deterministic parallel ``map`` whose ``numpy_function`` fills a few batches at a time;
   ``prefetch``; tf.data's autotuning off, see :meth:`PackedPipeline.dataset`) and yields
   dicts of numpy arrays ``[h, seq_len]``: ``input_ids``, ``targets``, ``loss_mask``,
   ``segment_ids``, ``positions``.

The config glue at the end (:func:`build_train_pipeline`, :func:`build_eval_pipeline`) goes
config -> APIBench examples -> retriever-aware training texts -> this pipeline.

The position is ``{"epoch": e, "step": s}``: the number of global batches of epoch ``e`` already
delivered. A training checkpoint saves :meth:`PipelineIterator.position` (JSON); a resumed run
passes it back to :meth:`PackedPipeline.iterator` and gets exactly the batches an uninterrupted
run would have got (planning an epoch is deterministic and cheap; skipping is free). It is the
same on every host and stays valid when the number of hosts changes.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from data_pipeline import packing
from gorilla_jax.errors import GorillaError

logger = logging.getLogger(__name__)

Pairs = Sequence[Any]  # (prompt, response) tuples or objects with .prompt and .response
Source = Union[Pairs, Callable[[int], Pairs]]  # fixed pairs, or the pairs of epoch e
_FOREVER = 2**62


@dataclass(frozen=True)
class Position:
    """Where a pipeline stands: ``step`` global batches of ``epoch`` already delivered."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "Position":
        if d is None:
            return cls()
        try:
            pos = cls(int(d["epoch"]), int(d["step"]))
        except (KeyError, TypeError, ValueError):
            raise GorillaError(f"data pipeline position must be {{'epoch': int, 'step': int}}; "
                               f"got {d!r}") from None
        if pos.epoch < 0 or pos.step < 0:
            raise GorillaError(f"data pipeline position must not be negative; got {d!r}")
        return pos


def _host_layout(global_batch_size: int, process_index: Optional[int],
                 process_count: Optional[int]) -> tuple[int, int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise GorillaError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch_size % process_count:
        raise GorillaError(f"train.global_batch_size ({global_batch_size}) must be divisible by "
                           f"the number of hosts ({process_count})")
    return process_index, process_count, global_batch_size // process_count


class PackedPipeline:
    """Packed, shuffled, host-sharded batches of tokenized (prompt, response) pairs.

    ``source`` is a sequence of pairs (the same every epoch) or a function ``epoch -> pairs``
    (e.g. retrieval modes redrawn per epoch; it must be deterministic). ``num_epochs=None``
    repeats forever. ``shuffle=False`` keeps the source order (for evaluation).
    """

    def __init__(self, source: Source, tokenizer, *, seq_len: int, global_batch_size: int,
                 pack: bool = True, seed: int = 0, shuffle: bool = True,
                 truncation: str = "truncate", num_epochs: Optional[int] = None,
                 prefetch: int = 2, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, include_example_ids: bool = False,
                 open_rows: int = 32, pad_id: Optional[int] = None, name: str = "train",
                 progress: bool = True, chunk_tokens: int = 1 << 18):
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)
        self.pack = pack
        self.seed = int(seed)
        self.shuffle = shuffle
        self.truncation = packing.check_policy(truncation)
        if num_epochs is not None and num_epochs < 1:
            raise GorillaError(f"num_epochs must be positive or None; got {num_epochs}")
        self.num_epochs = num_epochs
        self.prefetch = int(prefetch)
        self.process_index, self.process_count, self.host_batch_size = _host_layout(
            self.global_batch_size, process_index, process_count)
        self.include_example_ids = include_example_ids
        self.open_rows = open_rows
        self.pad_id = int(pad_id if pad_id is not None else getattr(tokenizer, "pad_id", 0) or 0)
        self.name = name
        self.progress = progress
        self.chunk_tokens = int(chunk_tokens)  # slots filled per tf.data map call
        self.fields = packing.FIELDS + (("example_ids",) if include_example_ids else ())
        self.info: dict = {}  # facts about the source for logs (e.g. parse counts per hub)
        self._lock = threading.RLock()  # tf.data's parallel map calls in from several threads
        self._tokenized: dict[int, tuple[packing.TokenizedExamples, packing.PackStats]] = {}
        self._plans: dict[int, tuple[packing.RowPlan, packing.PackStats]] = {}

    # ------------------------------------------------------------------ one epoch, global view

    def tokenized(self, epoch: int) -> tuple[packing.TokenizedExamples, packing.PackStats]:
        """The tokenized examples of ``epoch`` and their counts (cached)."""
        key = epoch if callable(self.source) else 0
        with self._lock:
            if key not in self._tokenized:
                pairs = self.source(epoch) if callable(self.source) else self.source
                kept = {k: v for k, v in self._tokenized.items() if k >= key - 1}
                kept[key] = self._tokenize(pairs, epoch)
                self._tokenized = kept
            return self._tokenized[key]

    def _tokenize(self, pairs: Pairs, epoch: int):
        bar = None
        if self.progress and len(pairs) > 4096:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pairs), desc=f"tokenizing {self.name} (epoch {epoch})",
                       unit="ex", leave=False)
        try:
            examples, stats = packing.tokenize_examples(
                pairs, self.tokenizer, self.seq_len, self.truncation,
                on_progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        if len(examples) == 0:
            raise GorillaError(f"the {self.name} data has no usable examples ({stats.examples} "
                               f"read, {stats.dropped} dropped as too long for seq_len "
                               f"{self.seq_len})")
        return examples, stats

    def order(self, epoch: int) -> np.ndarray:
        """The order of the tokenized examples in ``epoch``: a permutation seeded by (seed, epoch)."""
        n = len(self.tokenized(epoch)[0])
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def plan(self, epoch: int) -> tuple[packing.RowPlan, packing.PackStats]:
        """The row plan of ``epoch`` (every host's rows) and the epoch's counts (cached).

        The rows are padded to whole global batches; the counts add the tokenization counts
        (examples, dropped, truncated) to the packing counts.
        """
        with self._lock:
            if epoch not in self._plans:
                self._plans = {k: v for k, v in self._plans.items() if k >= epoch - 1}
                self._plans[epoch] = self._make_plan(epoch)
            return self._plans[epoch]

    def _make_plan(self, epoch: int) -> tuple[packing.RowPlan, packing.PackStats]:
        examples, tok_stats = self.tokenized(epoch)
        plan = packing.plan_rows(examples, self.order(epoch), self.seq_len, pack=self.pack,
                                 open_rows=self.open_rows)
        stats = tok_stats + plan.stats(examples)
        steps = -(-plan.n_rows // self.global_batch_size)
        stats.slots = steps * self.global_batch_size * self.seq_len
        logger.info("%s data, epoch %d: %d examples read, %d dropped, %d truncated "
                    "(%d prompt, %d response), %d tokens (%d with loss) in %d rows = %d steps "
                    "of %d, padding %.1f%%", self.name, epoch, stats.examples, stats.dropped,
                    stats.truncated, stats.truncated_prompt, stats.truncated_response,
                    stats.tokens, stats.loss_tokens, stats.rows, steps, self.global_batch_size,
                    100 * stats.padding_fraction)
        return plan, stats

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Global batches in ``epoch`` (can differ between epochs: packing depends on order)."""
        return -(-self.plan(epoch)[0].n_rows // self.global_batch_size)

    def stats(self, epoch: int = 0) -> packing.PackStats:
        """Counts of ``epoch``: examples, dropped, truncated, tokens, rows, padding."""
        return self.plan(epoch)[1]

    def _rows(self, epoch: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        plan, _ = self.plan(epoch)
        return packing.fill_rows(self.tokenized(epoch)[0], plan, rows, pad_id=self.pad_id,
                                 include_example_ids=self.include_example_ids)

    def host_rows(self, epoch: int, start_step: int, stop_step: int) -> dict[str, np.ndarray]:
        """This host's rows of global batches ``[start_step, stop_step)`` of ``epoch``, stacked:
        arrays ``[(stop_step - start_step) * host_batch_size, seq_len]``."""
        g, h = self.global_batch_size, self.host_batch_size
        steps = np.arange(start_step, stop_step, dtype=np.int64)
        rows = (steps[:, None] * g + self.process_index * h + np.arange(h)[None, :]).reshape(-1)
        return self._rows(epoch, rows)

    def host_batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch ``step`` of ``epoch``: ``[host_batch_size, seq_len]``."""
        return self.host_rows(epoch, step, step + 1)

    def global_batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """Global batch ``step`` of ``epoch`` (all hosts' rows): ``[global_batch_size, seq_len]``."""
        g = self.global_batch_size
        return self._rows(epoch, np.arange(step * g, (step + 1) * g))

    def dataset(self, position: Optional[dict | Position] = None):
        """The tf.data dataset of this host's batches from ``position`` on.

        Elements are tuples: the fields in :attr:`fields` (``[h, seq_len]``) followed by the
        epoch, the step and the epoch's step count (int64 scalars), from which the iterator
        keeps the position. Batches are filled by a deterministic parallel map.
        """
        import tensorflow as tf

        start = position if isinstance(position, Position) else Position.from_dict(position)
        end = _FOREVER if self.num_epochs is None else self.num_epochs
        h, s, fields = self.host_batch_size, self.seq_len, self.fields
        dtypes = [tf.as_dtype(packing.DTYPES[k]) for k in fields]
        chunk_steps = max(1, self.chunk_tokens // (h * s))

        def step_range(epoch):
            epoch = int(epoch)
            steps = self.steps_per_epoch(epoch)
            first = min(start.step, steps) if epoch == start.epoch else 0
            return np.int64(first), np.int64(steps)

        def make_chunk(epoch, step, stop):
            epoch, step, stop = int(epoch), int(step), int(stop)
            rows = self.host_rows(epoch, step, stop)
            return tuple(rows[k].reshape(stop - step, h, s) for k in fields)

        def epoch_batches(epoch):
            first, steps = tf.numpy_function(step_range, [epoch], [tf.int64, tf.int64],
                                             stateful=False)
            first.set_shape([])
            steps.set_shape([])

            def chunk(step):  # several batches per call: less per-batch overhead
                stop = tf.minimum(step + chunk_steps, steps)
                out = tf.numpy_function(make_chunk, [epoch, step, stop], dtypes, stateful=False)
                for t in out:
                    t.set_shape([None, h, s])
                n = stop - step
                return tuple(out) + (tf.fill([n], epoch), tf.range(step, stop),
                                     tf.fill([n], steps))

            return tf.data.Dataset.range(first, steps, chunk_steps).map(
                chunk, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()

        ds = tf.data.Dataset.range(start.epoch, end).flat_map(epoch_batches)
        ds = ds.prefetch(self.prefetch if self.prefetch > 0 else tf.data.AUTOTUNE)
        # No autotuning thread. Deleting an iterator waited, with the GIL held, for that
        # thread to wake up: the end of a one-minute, 200-step training run stalled for 24-27 s
        # in 12 of 14 runs of `gorilla-jax run`. The map's AUTOTUNE parallelism still gives one
        # call per core (at most 2 at once on 2 cores, as with autotuning on), and the tiny
        # config's batches still take ~4 ms each (400 in 1.6-2.0 s, as with autotuning on).
        options = tf.data.Options()
        options.autotune.enabled = False
        return ds.with_options(options)

    def iterator(self, position: Optional[dict | Position] = None) -> "PipelineIterator":
        """Batches for this host from ``position`` (a dict saved from an iterator, or None)."""
        return PipelineIterator(self, position)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterator()


class PipelineIterator:
    """Iterates a :class:`PackedPipeline` and knows its position for checkpoints."""

    def __init__(self, pipeline: PackedPipeline, position: Optional[dict | Position] = None):
        self.pipeline = pipeline
        start = position if isinstance(position, Position) else Position.from_dict(position)
        self._position = start
        self._it = pipeline.dataset(start).as_numpy_iterator()

    def position(self) -> dict:
        """JSON-serialisable position of the next batch: save it with a checkpoint."""
        return self._position.to_dict()

    def __iter__(self) -> "PipelineIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        element = next(self._it)
        k = len(self.pipeline.fields)
        epoch, step, steps = (int(x) for x in element[k:])
        step += 1
        self._position = Position(epoch + 1, 0) if step >= steps else Position(epoch, step)
        return dict(zip(self.pipeline.fields, element[:k]))


# ----------------------------------------------------------------------------- from the config


class _MemoRetriever:
    """Remembers a retriever's answers per (query, k): retrieval modes are redrawn each epoch,
    the documents a query retrieves never change."""

    def __init__(self, inner):
        self.inner, self.name, self._memo = inner, inner.name, {}

    def retrieve_batch(self, queries, k=1, examples=None):
        missing = [i for i, q in enumerate(queries) if (q, k) not in self._memo]
        if missing:
            found = self.inner.retrieve_batch([queries[i] for i in missing], k,
                                              [examples[i] for i in missing] if examples else None)
            for i, records in zip(missing, found):
                self._memo[(queries[i], k)] = records
        return [self._memo[(q, k)] for q in queries]


def _split_held_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded ``fraction`` of the examples held out for the eval loss."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_eval = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    perm = np.random.default_rng([seed, 0x5EED]).permutation(len(examples))
    held = set(perm[:n_eval].tolist())
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def _hubs(cfg) -> tuple[str, ...]:
    from data_pipeline import layout

    hub = cfg.data.hub
    if hub == "all":
        return layout.HUBS
    if hub == "custom":
        if not cfg.data.apis:
            raise GorillaError("config key 'data.hub' is 'custom' but 'data.apis' is not set: give "
                               "an API database (JSONL, e.g. from `gorilla-jax apis import-zoo`)")
        return ("custom",)
    return (layout.check_hub(hub),)


def _load_hub(cfg, hub: str, needs_db: bool):
    """(train examples, ParseStats, API database or None) of one hub; ``custom`` reads data.apis."""
    from data_pipeline import apibench

    d = cfg.data
    if hub == "custom":
        from data_pipeline.custom_hub import load_custom_hub

        custom = load_custom_hub(d.apis, skip_malformed=d.skip_malformed)
        examples = custom.examples("train", synthesize=d.synthesize_from_docs)
        if not examples:
            raise GorillaError(f"{d.apis}: no training instructions in this API database (no "
                               "'questions' or 'examples'); generate some with `gorilla-jax data "
                               "self-instruct` or set data.synthesize_from_docs=true")
        return examples, custom.stats, custom.db
    examples, stats = apibench.load_examples(hub, "train", d.data_dir,
                                             skip_malformed=d.skip_malformed,
                                             synthesize=d.synthesize_from_docs)
    db = apibench.load_api_db(hub, d.data_dir, skip_malformed=d.skip_malformed) if needs_db else None
    return examples, stats, db


class TrainingData:
    """A config's training examples per hub, split into train and held-out, with their retrievers.

    ``data.hub=custom`` reads the API database ``data.apis`` (:mod:`data_pipeline.custom_hub`):
    its train split of instructions, retrievers over its records.

    ``texts(split, epoch)`` gives the (prompt, response) texts: the retrieval mode of each
    example is drawn from ``data.retriever_probs`` with a seed made of ``data.shuffle_seed``,
    the epoch and the hub (``redraw_per_epoch=False``: the same draw every epoch).
    """

    def __init__(self, cfg, tokenizer=None, redraw_per_epoch: bool = True):
        from data_pipeline import retrieval

        d = cfg.data
        self.cfg, self.tokenizer, self.redraw_per_epoch = cfg, tokenizer, redraw_per_epoch
        self.hubs = _hubs(cfg)
        self.parse_stats: dict[str, dict] = {}
        self.examples: dict[str, dict[str, list]] = {"train": {}, "eval": {}}
        self.retrievers: dict[str, dict] = {}
        needs_db = [m for m, p in d.retriever_probs.items() if p > 0 and m in ("bm25", "dense")]
        for hub in self.hubs:
            examples, stats, db = _load_hub(cfg, hub, bool(needs_db))
            synthesized = sum(1 for ex in examples if ex.synthesized)
            self.parse_stats[hub] = {"path": stats.path, "read": stats.read, "parsed": stats.parsed,
                                     "skipped": stats.n_skipped, "synthesized": synthesized}
            logger.info("%s train data: %s%s", hub, stats.summary(),
                        f" ({synthesized} synthesized from the API docs)" if synthesized else "")
            train, held = _split_held_out(examples, d.eval_fraction, d.shuffle_seed)
            self.examples["train"][hub], self.examples["eval"][hub] = train, held
            self.retrievers[hub] = {m: _MemoRetriever(retrieval.make_retriever(m, db))
                                    for m in needs_db}

    def count(self, split: str) -> int:
        return sum(len(v) for v in self.examples[split].values())

    def texts(self, split: str, epoch: int = 0) -> list:
        """The TrainingText list of ``split`` (train | eval) for ``epoch``, hubs in order."""
        from data_pipeline import prompts

        d = self.cfg.data
        draw = epoch if (self.redraw_per_epoch and split == "train") else 0
        out = []
        for h, hub in enumerate(self.hubs):
            examples = self.examples[split][hub]
            if not examples:
                continue
            seed = int(np.random.SeedSequence([d.shuffle_seed, draw, h, split == "eval"])
                       .generate_state(1)[0])
            out += prompts.training_texts(examples, self.retrievers[hub], d.retriever_probs,
                                          seed, d.prompt_format, top_k=d.top_k,
                                          tokenizer=self.tokenizer)
        return out


def _resolve_tokenizer(cfg, tokenizer):
    if tokenizer is not None:
        return tokenizer
    if not cfg.data.tokenizer:
        raise GorillaError("config key 'data.tokenizer' is not set: give a tokenizer path "
                           "(tokenizer.model, tokenizer.json or an HF directory)")
    from gorilla_jax.tokenizer import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer)


def build_train_pipeline(cfg, tokenizer=None, *, data: Optional[TrainingData] = None,
                         process_index: Optional[int] = None, process_count: Optional[int] = None,
                         num_epochs: Optional[int] = None, truncation: Optional[str] = None,
                         redraw_per_epoch: Optional[bool] = None, **kwargs) -> PackedPipeline:
    """Config -> APIBench examples -> retriever-aware texts -> tokens -> packed host batches.

    Reads ``data.*`` (hub, data_dir, skip_malformed, synthesize_from_docs, eval_fraction,
    retriever_probs, top_k, prompt_format, seq_len, pack, shuffle_seed, prefetch, tokenizer)
    and ``train.global_batch_size``. ``tokenizer`` defaults to ``data.tokenizer``. Pass the same
    ``data`` (a :class:`TrainingData`) to :func:`build_eval_pipeline` to read the files once.
    Repeats forever unless ``num_epochs``; the per-hub parse counts are in ``pipeline.info``.
    """
    tokenizer = _resolve_tokenizer(cfg, tokenizer)
    truncation = truncation or cfg.data.truncation
    if redraw_per_epoch is None:
        redraw_per_epoch = cfg.data.redraw_retrieval
    data = data or TrainingData(cfg, tokenizer, redraw_per_epoch)
    if data.count("train") == 0:
        raise GorillaError(f"no training examples for data.hub={cfg.data.hub!r}")
    source = (lambda epoch: data.texts("train", epoch)) if data.redraw_per_epoch \
        else data.texts("train", 0)
    pipe = PackedPipeline(source, tokenizer, seq_len=cfg.data.seq_len,
                          global_batch_size=cfg.train.global_batch_size, pack=cfg.data.pack,
                          seed=cfg.data.shuffle_seed, truncation=truncation,
                          num_epochs=num_epochs, prefetch=cfg.data.prefetch,
                          process_index=process_index, process_count=process_count,
                          name="train", **kwargs)
    pipe.info["parse"] = data.parse_stats
    return pipe


def build_eval_pipeline(cfg, tokenizer=None, *, data: Optional[TrainingData] = None,
                        process_index: Optional[int] = None, process_count: Optional[int] = None,
                        truncation: Optional[str] = None, **kwargs) -> Optional[PackedPipeline]:
    """The held-out examples (``data.eval_fraction`` of train) as one unshuffled epoch of packed
    batches, for the eval loss; None when nothing is held out."""
    tokenizer = _resolve_tokenizer(cfg, tokenizer)
    truncation = truncation or cfg.data.truncation
    data = data or TrainingData(cfg, tokenizer)
    if data.count("eval") == 0:
        return None
    pipe = PackedPipeline(data.texts("eval"), tokenizer, seq_len=cfg.data.seq_len,
                          global_batch_size=cfg.train.global_batch_size, pack=cfg.data.pack,
                          shuffle=False, truncation=truncation, num_epochs=1,
                          prefetch=cfg.data.prefetch, process_index=process_index,
                          process_count=process_count, name="eval", **kwargs)
    pipe.info["parse"] = data.parse_stats
    return pipe
