"""The evaluation runner: APIBench questions -> prompts -> batched generation -> responses -> scores.

::

    model = load_eval_model("runs/tiny")                 # a run dir, checkpoint or HF directory
    run = evaluate_hub(model, "torchhub", "oracle", out_dir="eval_out")
    print(run.scores["gorilla"].accuracy, run.scores["strict"].accuracy)
    run = evaluate_hub(model, "custom", "bm25", "eval_out", apis="my_apis.jsonl")
    print(run.scores["strict"].accuracy)                 # a custom hub: strict mode only

Prompts are built by the data pipeline's own functions (data_pipeline.prompts): the question
text of Gorilla's question files (``question_with_documents``), wrapped in the prompt format
the model was trained with (``wrap_prompt``), tokenized exactly as training saw it
(``data_pipeline.packing.prompt_ids``: BOS, then the prompt). For a training run directory the
format is the run's ``data.prompt_format``; for other models ``auto`` means the tokenizer's chat
template when it has one, else Gorilla's ``###USER: ...###ASSISTANT: ``.

Generation is batched (gorilla_jax.generate.Generator, compiled once per bucketed shape):
prompts are sorted by length so each batch pads little, and a progress bar with an ETA
advances per batch. A sequence stops at the model's EOS ids or, in the gorilla format, at the
start of a new ``###USER:`` turn. A prompt longer than the model can take with the new tokens
loses tokens from its start (after the BOS), as training truncates prompts; such prompts are
counted.

The response file is Gorilla's format, one JSON object per line: ``question_id``, ``text``,
``answer_id``, ``model_id``, ``metadata``. Gorilla's ``ast_eval_*.py`` scripts and
``gorilla-jax eval score`` both read it; it is scored here in both modes (gorilla, strict).

**A custom hub** (``hub="custom"``, ``apis=`` an API database, :mod:`data_pipeline.custom_hub`):
the questions are the database's eval split of instructions (question ``q`` is its ``q``-th eval
example, as ``gorilla-jax eval score --hub custom`` reads it), the bm25 and dense retrievers
search the database's records, the prompts are built by the same functions, and the responses
are scored in strict mode only (:func:`eval.score.score_custom`): Gorilla's mode exists for the
three APIBench hubs alone, so a custom run has no gorilla score at all. The documentation-change
and constraint evaluations read APIBench's files and matcher; :data:`CUSTOM_HUB_SKIPS` says why
they are not run on a custom hub.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from gorilla_jax.errors import GorillaError

USER_STOP = "###USER:"
SCORE_MODES = ("gorilla", "strict")
CUSTOM = "custom"
CUSTOM_SCORE_MODES = ("strict",)
# Evaluations that exist for the APIBench hubs only, and why (reported, never skipped silently).
CUSTOM_HUB_SKIPS = {
    "doc_change": "not run on a custom hub: the documentation-change evaluation reads the "
                  "APIBench hub's eval files and judges which document a response followed with "
                  "the Gorilla-mode matcher of an APIBench API database (eval.api_db), which a "
                  "custom database (strict matching only) does not have",
    "constraints": "not run on a custom hub: constraint questions are built from APIBench's "
                   "`performance` fields (parameters, top-1 accuracy) and judged with the "
                   "Gorilla-mode matcher of an APIBench API database (eval.api_db)",
}


def score_modes(hub: str) -> tuple:
    """The scoring modes a hub has: both for APIBench, strict only for a custom hub."""
    return CUSTOM_SCORE_MODES if hub == CUSTOM else SCORE_MODES


# ----------------------------------------------------------------------------- the model



class VerdictRates:
    """Rates over a ``verdicts`` list (one verdict string per question), shared by the
    documentation-change and constraint evaluations."""

    verdicts: list

    @property
    def n(self) -> int:
        return len(self.verdicts)

    def rate(self, verdict: str) -> float:
        return sum(1 for v in self.verdicts if v == verdict) / self.n if self.n else 0.0

    @property
    def hallucination(self) -> float:
        return self.rate("hallucination")


@dataclass
class EvalModel:
    """A model ready to answer prompts: params inside a Generator, tokenizer, prompt format."""

    model_id: str
    config: Any  # ModelConfig
    tokenizer: Any
    prompt_format: str
    eos_ids: tuple
    generator: Any  # gorilla_jax.generate.Generator
    max_prompt_tokens: Optional[int] = None  # None: max_position_embeddings - new tokens

    def prompt_ids(self, prompt: str) -> list[int]:
        from data_pipeline.packing import prompt_ids

        return prompt_ids(self.tokenizer, prompt)

    def stop_strings(self) -> tuple:
        return (USER_STOP,) if self.prompt_format == "gorilla" else ()


def resolve_prompt_format(model_path: Optional[str | os.PathLike], tokenizer,
                          requested: str = "auto") -> str:
    """``gorilla`` | ``chat``: as requested, else a run's own format, else by the tokenizer."""
    from data_pipeline.prompts import PROMPT_FORMATS

    if requested != "auto":
        if requested not in PROMPT_FORMATS:
            raise GorillaError(f"unknown prompt format '{requested}': choose auto, "
                               f"{', '.join(PROMPT_FORMATS)}")
        return requested
    if model_path is not None:
        from gorilla_jax.run_dir import is_run_dir, run_prompt_format

        if is_run_dir(model_path):
            return run_prompt_format(model_path)
    return "chat" if getattr(tokenizer, "has_chat_template", False) else "gorilla"


def make_eval_model(params, config, tokenizer, *, prompt_format: str = "gorilla",
                    eos_ids: Sequence[int] = (), model_id: str = "model", mesh=None,
                    max_batch: Optional[int] = None,
                    max_prompt_tokens: Optional[int] = None,
                    cache_windows: Optional[int] = None) -> EvalModel:
    """An :class:`EvalModel` from params already in memory (e.g. right after training)."""
    from gorilla_jax.generate import Generator

    eos = [int(e) for e in eos_ids if e is not None]
    if tokenizer.eos_id is not None and tokenizer.eos_id not in eos:
        eos.insert(0, int(tokenizer.eos_id))
    if tokenizer.vocab_size > config.vocab_size:
        raise GorillaError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's "
                           f"vocabulary is {config.vocab_size}: wrong tokenizer?")
    gen = Generator(params, config, mesh=mesh, pad_id=tokenizer.pad_id, max_batch=max_batch,
                    cache_windows=cache_windows)
    return EvalModel(model_id, config, tokenizer, prompt_format, tuple(dict.fromkeys(eos)), gen,
                     max_prompt_tokens)


def load_eval_model(path: str | os.PathLike, *, tokenizer_path: Optional[str | os.PathLike] = None,
                    prompt_format: str = "auto", dtype: Optional[str] = None, mesh=None,
                    model_id: Optional[str] = None,
                    cache_windows: Optional[int] = None) -> EvalModel:
    """Load an HF directory, a params checkpoint or a training run directory for evaluation."""
    from gorilla_jax.loading import default_tokenizer_path, load_model, model_eos_ids
    from gorilla_jax.run_dir import is_run_dir, read_run_config
    from gorilla_jax.tokenizer import load_tokenizer

    path = Path(path)
    if not path.exists():
        raise GorillaError(f"{path}: model path does not exist")
    tok_path = tokenizer_path or default_tokenizer_path(path)
    if tok_path is None:
        raise GorillaError(f"{path}: no tokenizer found with the model; pass --tokenizer")
    tokenizer = load_tokenizer(tok_path)
    config, params = load_model(path, dtype=dtype, mesh=mesh)
    fmt = resolve_prompt_format(path, tokenizer, prompt_format)
    max_prompt = None
    if is_run_dir(path):  # prompts as long as training allowed, no longer
        max_prompt = read_run_config(path).data.seq_len
    return make_eval_model(params, config, tokenizer, prompt_format=fmt,
                           eos_ids=model_eos_ids(path), model_id=model_id or path.name, mesh=mesh,
                           max_prompt_tokens=max_prompt, cache_windows=cache_windows)


# ----------------------------------------------------------------------------- questions


@dataclass
class Question:
    """One evaluation question: Gorilla's question text and the model's prompt for it."""

    question_id: int
    text: str  # Gorilla's question text (documents included)
    prompt: str  # the model input: text wrapped in the prompt format
    documents: list = field(default_factory=list)  # ApiRecords shown to the model
    example: Any = None  # data_pipeline.apibench.Example (None for built questions)
    meta: dict = field(default_factory=dict)


def custom_hub(apis):
    """The :class:`~data_pipeline.custom_hub.CustomHub` of ``apis`` (a path or a hub); a
    GorillaError when there is none."""
    from data_pipeline.custom_hub import CustomHub, load_custom_hub

    if apis is None:
        raise GorillaError("hub 'custom' needs an API database (apis=DB.jsonl, --apis, "
                           "config key 'data.apis')")
    return apis if isinstance(apis, CustomHub) else load_custom_hub(apis)


def _check_apis(hub: str, apis) -> None:
    if hub != CUSTOM and apis is not None:
        raise GorillaError(f"an API database (apis) is only for hub 'custom', not '{hub}'")


def eval_examples(hub: str, data_dir: Optional[str | os.PathLike] = None,
                  limit: Optional[int] = None, *, apis=None) -> list:
    """The eval examples, first ``limit``: for an APIBench hub those Gorilla's question files
    keep (ids are eval line numbers); for ``custom`` the eval split of ``apis`` (ids are
    positions in it)."""
    _check_apis(hub, apis)
    if hub == CUSTOM:
        kept = custom_hub(apis).examples("eval")
    else:
        from data_pipeline.apibench import load_examples

        examples, _ = load_examples(hub, "eval", data_dir)
        kept = [ex for ex in examples if ex.in_gorilla_questions]
    return kept[:limit] if limit else kept


def make_retriever_for(hub: str, mode: str, data_dir: Optional[str | os.PathLike] = None, *,
                       apis=None):
    """The retriever ``mode`` over the hub's API database (``apis`` for ``custom``)."""
    from data_pipeline.apibench import load_api_db
    from data_pipeline.retrieval import make_retriever

    _check_apis(hub, apis)
    db = None
    if mode in ("bm25", "dense"):
        db = custom_hub(apis).db if hub == CUSTOM else load_api_db(hub, data_dir)
    return make_retriever(mode, db)


def build_questions(examples: Sequence, retriever, prompt_format: str, tokenizer=None,
                    top_k: int = 1) -> list[Question]:
    """Questions for eval examples, their text exactly as Gorilla's question files have it
    (``data_pipeline.prompts.question_records``) and the prompt as training wraps it."""
    from data_pipeline.prompts import question_text, question_with_documents, wrap_prompt

    found = retriever.retrieve_batch([question_text(ex) for ex in examples], top_k, list(examples))
    out = []
    for ex, docs in zip(examples, found):
        text = question_with_documents(ex, retriever.name, docs)
        out.append(Question(ex.index, text, wrap_prompt(text, prompt_format, tokenizer),
                            list(docs), ex, {"retriever": retriever.name}))
    return out


# ----------------------------------------------------------------------------- generation


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    batch_size: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> "GenerationSettings":
        if self.max_new_tokens <= 0:
            raise GorillaError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.batch_size <= 0:
            raise GorillaError(f"batch_size must be positive, got {self.batch_size}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise GorillaError(f"temperature must be >= 0 and top_p in (0, 1]; got "
                               f"{self.temperature}, {self.top_p}")
        return self


@dataclass
class Generated:
    texts: list
    new_tokens: list  # token count per response
    truncated_prompts: int
    seconds: float


def _fit_prompt(ids: list[int], limit: int, has_bos: bool) -> list[int]:
    """Cut a prompt from the left to ``limit`` tokens, keeping its BOS (as training does)."""
    if len(ids) <= limit:
        return ids
    head = ids[:1] if has_bos else []
    return head + ids[len(ids) - (limit - len(head)):]


def _cut_stop(text: str, stops: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def generate_texts(model: EvalModel, prompts: Sequence[str], settings: GenerationSettings, *,
                   progress: bool = True, desc: str = "generate") -> Generated:
    """Responses to ``prompts`` (in order), generated in length-sorted batches."""
    settings.check()
    tok = model.tokenizer
    has_bos = tok.bos_id is not None and tok.bos_id >= 0
    limit = model.config.max_position_embeddings - settings.max_new_tokens
    if model.max_prompt_tokens:
        limit = min(limit, model.max_prompt_tokens)
    if limit < 2:
        raise GorillaError(f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt "
                           f"(the model takes {model.config.max_position_embeddings} positions)")
    ids = [model.prompt_ids(p) for p in prompts]
    truncated = sum(1 for x in ids if len(x) > limit)
    ids = [_fit_prompt(x, limit, has_bos) for x in ids]
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    stops = model.stop_strings()
    texts: list[Optional[str]] = [None] * len(ids)
    counts = [0] * len(ids)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc=desc, unit="q", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for b, start in enumerate(range(0, len(order), settings.batch_size)):
            idx = order[start:start + settings.batch_size]
            new = model.generator.generate(
                [ids[i] for i in idx], settings.max_new_tokens, eos_ids=model.eos_ids,
                temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed + b,
                stop_strings=stops, decode_fn=tok.decode if stops else None)
            for i, toks in zip(idx, new):
                counts[i] = len(toks)
                texts[i] = _cut_stop(tok.decode(toks), stops).strip()
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return Generated(texts, counts, truncated, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- responses


def answer_id(model_id: str, question_id: int, text: str) -> str:
    """A stable id for a response (Gorilla used random ones; stable ids make files reproducible)."""
    return hashlib.sha1(f"{model_id}\0{question_id}\0{text}".encode("utf-8")).hexdigest()[:22]


def response_records(questions: Sequence[Question], texts: Sequence[str], model_id: str,
                     metadata: Optional[dict] = None) -> list[dict]:
    """Gorilla-format response objects, one per question."""
    if len(questions) != len(texts):
        raise GorillaError(f"{len(questions)} questions but {len(texts)} responses")
    return [{"question_id": q.question_id, "text": t, "answer_id": answer_id(model_id, q.question_id, t),
             "model_id": model_id, "metadata": {**(metadata or {}), **q.meta}}
            for q, t in zip(questions, texts)]


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- one hub


@dataclass
class HubRun:
    """The outcome of evaluating one hub with one retriever."""

    hub: str
    retriever: str
    responses_path: Path
    scores: dict  # mode -> eval.score.ScoreResult (strict only for a custom hub)
    generation_seconds: float
    truncated_prompts: int
    mean_new_tokens: float
    apis: Optional[str] = None  # the API database of a custom hub

    @property
    def n(self) -> int:
        return next(iter(self.scores.values())).n

    def summary(self) -> dict:
        out = {"hub": self.hub, "retriever": self.retriever, "n": self.n,
               "responses": str(self.responses_path),
               "generation_seconds": round(self.generation_seconds, 2),
               "truncated_prompts": self.truncated_prompts,
               "mean_new_tokens": round(self.mean_new_tokens, 1),
               "scores": {m: r.summary() for m, r in self.scores.items()}}
        if self.apis is not None:
            out["apis"] = self.apis
        return out


def check_custom_eval(apis) -> Any:
    """The custom hub of ``apis`` when it has eval questions; else a GorillaError naming the file."""
    from data_pipeline.custom_hub import EVAL_SHARE

    hub = custom_hub(apis)
    if not hub.examples("eval"):
        raise GorillaError(
            f"{hub.path}: no eval questions in this API database: its instructions ('questions' "
            f"or self-instruct 'examples') are split by a hash, about {100 * EVAL_SHARE:.0f}% "
            "held out for evaluation, and none fell there; add instructions, e.g. with "
            "`gorilla-jax data self-instruct`")
    return hub


def evaluate_hub(model: EvalModel, hub: str, retriever: str, out_dir: str | os.PathLike, *,
                 data_dir: Optional[str | os.PathLike] = None, apis=None,
                 limit: Optional[int] = None, settings: Optional[GenerationSettings] = None,
                 top_k: int = 1, progress: bool = True) -> HubRun:
    """Generate answers to a hub's eval questions and score them: both modes for an APIBench
    hub, strict only for ``custom`` (``apis``: the API database's path, or a CustomHub).

    Writes ``OUT/<hub>_<retriever>/responses.jsonl``, ``details_<mode>.jsonl`` (one verdict
    per response) and ``scores.json``.
    """
    from eval.score import score_custom, score_responses, write_details, write_jsonl_atomic

    settings = (settings or GenerationSettings()).check()
    _check_apis(hub, apis)
    custom = check_custom_eval(apis) if hub == CUSTOM else None
    examples = eval_examples(hub, data_dir, limit, apis=custom)
    if not examples:
        raise GorillaError(f"hub '{hub}' has no eval questions in {data_dir or 'the default data'}")
    questions = build_questions(examples, make_retriever_for(hub, retriever, data_dir, apis=custom),
                                model.prompt_format, model.tokenizer, top_k)
    gen = generate_texts(model, [q.prompt for q in questions], settings, progress=progress,
                         desc=f"{hub}/{retriever}")
    meta = {"hub": hub, "prompt_format": model.prompt_format}
    if custom is not None:
        meta["apis"] = str(custom.path)
    records = response_records(questions, gen.texts, model.model_id, meta)
    sub = Path(out_dir) / f"{hub}_{retriever}"
    responses_path = sub / "responses.jsonl"
    write_jsonl_atomic(responses_path, records)
    scores = {}
    for mode in score_modes(hub):
        if custom is not None:
            scores[mode] = score_custom(custom, records, mode, source=str(responses_path))
        else:
            scores[mode] = score_responses(hub, records, data_dir, mode, source=str(responses_path))
        write_details(scores[mode], sub / f"details_{mode}.jsonl")
    run = HubRun(hub, retriever, responses_path, scores, gen.seconds, gen.truncated_prompts,
                 sum(gen.new_tokens) / max(len(gen.new_tokens), 1),
                 str(custom.path) if custom is not None else None)
    write_json_atomic(sub / "scores.json", run.summary())
    return run
