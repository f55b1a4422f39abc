"""An OpenAI-compatible HTTP server over the batched JAX generator.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both
with ``"stream": true`` as server-sent events ending in ``data: [DONE]``), ``GET /health``.
Standard library only (:class:`http.server.ThreadingHTTPServer`): one thread per connection
parses and validates the request, tokenizes, and hands it to the batcher.

**Batching.** One background thread (:class:`Batcher`) owns the model. It takes the requests
waiting in its queue, waits up to ``batch_wait`` seconds for more (up to ``max_batch``), and
runs the requests that share sampling settings (temperature, top-p, seed, stop strings)
through :meth:`gorilla_jax.generate.Generator.generate` as one batch. It works in rounds: a
round generates for every request in the batch at once; requests that finish (EOS, a stop
string, ``max_tokens``) leave, requests that arrived meanwhile join the next round. When a
request streams, a round is ``stream_tokens`` tokens long and its new text is sent after each
round (the next round continues from the prompt plus what was generated, so the text is the
same as without streaming); otherwise a round runs to the longest ``max_tokens`` of the batch.
Every response carries ``X-Batch-Size`` (the largest batch the request ran in) and
:meth:`Batcher.stats` counts rounds and batch sizes.

**Bad requests** get a 4xx JSON error ``{"error": {"message", "type", "param", "code"}}``:
malformed JSON or fields (400), an unknown model (404), a body over ``max_body_bytes`` (413).
A prompt that does not fit the model's context (prompt tokens + ``max_tokens`` > the context
length) is rejected with 400 ``context_length_exceeded``, never truncated.

**Chat prompts** use the tokenizer's chat template when it has one, else Gorilla's format
(``###USER: ...###ASSISTANT: ``, :mod:`data_pipeline.prompts`).
"""
from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional, Sequence

from gorilla_jax.errors import GorillaError

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 256
MAX_STOP_STRINGS = 4
_UNSUPPORTED = {  # field -> values that mean "off" (anything else is rejected)
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "suffix": (None, ""), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []), "functions": (None, []),
}


class RequestError(Exception):
    """A bad request: HTTP status, message, the offending parameter and an error code."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


# ----------------------------------------------------------------------------- the model side


class ModelBackend:
    """A generator, its tokenizer and the facts the server needs (context length, EOS ids)."""

    def __init__(self, generator, tokenizer, *, model_id: str, max_context: int,
                 eos_ids: Sequence[int] = ()):
        self.generator = generator
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_context = int(max_context)
        ids = [tokenizer.eos_id, *eos_ids]
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in ids if i is not None))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if getattr(self.tokenizer, "has_chat_template", False):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=True)
        from data_pipeline.prompts import ASSISTANT_PREFIX, USER_PREFIX

        text = ""
        for m in messages:
            if m["role"] == "assistant":
                text += ASSISTANT_PREFIX + m["content"]
            elif m["role"] == "system":
                text += m["content"] + "\n"
            else:
                text += USER_PREFIX + m["content"]
        return self.encode(text + ASSISTANT_PREFIX)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float,
                 top_p: float, seed: int, stop: Sequence[str]) -> list[list[int]]:
        return self.generator.generate(prompts, max_new_tokens, eos_ids=self.eos_ids,
                                       temperature=temperature, top_p=top_p, seed=seed,
                                       stop_strings=tuple(stop),
                                       decode_fn=self.decode if stop else None)


def load_backend(model: str, tokenizer: Optional[str] = None, *, model_id: Optional[str] = None,
                 dtype: Optional[str] = None, max_context: Optional[int] = None,
                 max_batch: Optional[int] = None,
                 cache_windows: Optional[int] = None) -> ModelBackend:
    """A backend for a converted checkpoint or HF directory (and its own tokenizer by default)."""
    from pathlib import Path

    from gorilla_jax.generate import Generator
    from gorilla_jax.loading import default_tokenizer_path, load_model, model_eos_ids
    from gorilla_jax.tokenizer import load_tokenizer

    tok_path = tokenizer or default_tokenizer_path(model)
    if tok_path is None:
        raise GorillaError(f"{model}: has no tokenizer files; pass --tokenizer")
    tok = load_tokenizer(tok_path)
    config, params = load_model(model, dtype=dtype)
    if tok.vocab_size > config.vocab_size:
        raise GorillaError(f"{tok_path}: tokenizer vocabulary ({tok.vocab_size}) is larger than "
                           f"the model's ({config.vocab_size}): wrong tokenizer?")
    context = int(max_context or config.max_position_embeddings)
    if context > config.max_position_embeddings:
        raise GorillaError(f"max context {context} is larger than the model's "
                           f"max_position_embeddings ({config.max_position_embeddings})")
    gen = Generator(params, config, pad_id=tok.pad_id, max_batch=max_batch,
                    cache_windows=cache_windows)
    return ModelBackend(gen, tok, model_id=model_id or Path(model).resolve().name,
                        max_context=context, eos_ids=model_eos_ids(model))


# ----------------------------------------------------------------------------- batching


@dataclass
class GenRequest:
    """One choice to generate. ``events`` receives ("delta", i, text) / ("done", i, reason) /
    ("error", i, message)."""

    prompt_ids: list
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple = ()
    stream: bool = False
    index: int = 0
    events: "queue.Queue" = field(default_factory=queue.Queue)
    generated: list = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already streamed
    finish_reason: Optional[str] = None
    batch_size: int = 0  # the largest batch this request ran in
    rounds: int = 0
    arrived: float = field(default_factory=time.monotonic)

    @property
    def group(self) -> tuple:
        return (self.temperature, self.top_p, self.seed, self.stop)


class Batcher:
    """The thread that runs all generation, batching concurrent requests (module docstring)."""

    def __init__(self, backend: ModelBackend, *, max_batch: int = 8, batch_wait: float = 0.01,
                 stream_tokens: int = 16):
        if max_batch < 1 or stream_tokens < 1 or batch_wait < 0:
            raise GorillaError("max_batch and stream_tokens must be >= 1, batch_wait >= 0")
        self.backend = backend
        self.max_batch = int(max_batch)
        self.batch_wait = float(batch_wait)
        self.stream_tokens = int(stream_tokens)
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._rounds: list[int] = []  # batch size of every round
        self._thread = threading.Thread(target=self._run, name="gorilla-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: GenRequest) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def stats(self) -> dict:
        with self._lock:
            rounds = list(self._rounds)
        return {"rounds": len(rounds), "batch_sizes": rounds,
                "max_batch_size": max(rounds, default=0)}

    # ------------------------------------------------------------------ the loop

    def _collect(self, active: list, block: bool) -> None:
        """Move queued requests into ``active``; when ``block``, wait for the first one and
        then up to ``batch_wait`` for more."""
        if block:
            item = self._queue.get()
            if item is not None:
                active.append(item)
            deadline = time.monotonic() + self.batch_wait
            while len(active) < self.max_batch and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is not None:
                    active.append(item)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                active.append(item)

    def _run(self) -> None:
        active: list[GenRequest] = []
        while not self._stop.is_set():
            self._collect(active, block=not active)
            if not active or self._stop.is_set():
                continue
            oldest = min(active, key=lambda r: r.arrived)
            batch = [r for r in active if r.group == oldest.group][:self.max_batch]
            try:
                self._round(batch)
            except Exception as e:  # report to the waiting clients, keep serving
                logger.exception("generation failed")
                for r in batch:
                    r.finish_reason = "error"
                    r.events.put(("error", r.index, f"generation failed: {e}"))
            active = [r for r in active if r.finish_reason is None]
        for r in active:
            r.events.put(("error", r.index, "the server is shutting down"))

    def _round(self, batch: list[GenRequest]) -> None:
        remaining = [r.max_tokens - len(r.generated) for r in batch]
        n = min(self.stream_tokens, max(remaining)) if any(r.stream for r in batch) else max(remaining)
        first = batch[0]
        seed = (first.seed if first.seed is not None else 0) + first.rounds
        outs = self.backend.generate([r.prompt_ids + r.generated for r in batch], n,
                                     temperature=first.temperature, top_p=first.top_p,
                                     seed=seed, stop=first.stop)
        with self._lock:
            self._rounds.append(len(batch))
        for r, new in zip(batch, outs):
            r.batch_size = max(r.batch_size, len(batch))
            r.rounds += 1
            self._advance(r, new, n)

    def _advance(self, r: GenRequest, new: list, n: int) -> None:
        eos = set(self.backend.eos_ids)
        reason = None
        for tok in new:
            if tok in eos:
                reason = "stop"
                break
            r.generated.append(int(tok))
            if len(r.generated) >= r.max_tokens:
                reason = "length"
                break
        if reason is None and len(new) < n:  # the generator stopped early: a stop string
            reason = "stop"
        text = self.backend.decode(r.generated)
        cut = min((text.find(s) for s in r.stop if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        r.text = text
        if reason is None:  # hold back what could still change: a partial character or stop
            hold = max((len(s) - 1 for s in r.stop), default=0)
            safe = len(text) - hold
            while safe > r.sent and text[safe - 1] == "\ufffd":
                safe -= 1
        else:
            safe = len(text)
        if r.stream and safe > r.sent:
            r.events.put(("delta", r.index, text[r.sent:safe]))
            r.sent = safe
        if reason is not None:
            r.finish_reason = reason
            r.events.put(("done", r.index, reason))


# ----------------------------------------------------------------------------- request parsing


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, key: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
        raise RequestError(400, f"'{key}' must be a number, got {v!r}", key)
    if v < low or v > high or (low_open and v == low):
        raise RequestError(400, f"'{key}' must be in {'(' if low_open else '['}{low}, {high}], got {v}", key)
    return float(v)


def _stop(body: dict) -> tuple:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > MAX_STOP_STRINGS:
        raise RequestError(400, f"'stop' must be a non-empty string or a list of at most "
                           f"{MAX_STOP_STRINGS} non-empty strings", "stop")
    return tuple(dict.fromkeys(stop))


def _check_unsupported(body: dict) -> None:
    for key, off in _UNSUPPORTED.items():
        if key in body and body[key] not in off:
            raise RequestError(400, f"'{key}'={body[key]!r} is not supported by this server", key,
                               "unsupported_parameter")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects",
                           "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(400, f"messages[{i}] must be an object with 'role' system, user "
                               "or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise RequestError(400, f"messages[{i}].content parts must be text parts",
                                   f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string",
                               f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def _prompts(body: dict) -> list:
    """The prompt(s) of a completion request: texts (str) or token-id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise RequestError(400, "'prompt' must be a string, a list of strings, or token ids", "prompt")


# ----------------------------------------------------------------------------- HTTP


class GorillaServer:
    """The HTTP server: ``start()`` serves in a background thread, ``serve_forever()`` in this one."""

    def __init__(self, backend: ModelBackend, host: str = "127.0.0.1", port: int = 8000, *,
                 max_batch: int = 8, batch_wait: float = 0.01, stream_tokens: int = 16,
                 max_body_bytes: int = 4 << 20, default_chat_tokens: int = DEFAULT_CHAT_TOKENS):
        self.backend = backend
        self.batcher = Batcher(backend, max_batch=max_batch, batch_wait=batch_wait,
                               stream_tokens=stream_tokens)
        self.max_body_bytes = int(max_body_bytes)
        self.default_chat_tokens = int(default_chat_tokens)
        self.created = int(time.time())
        self._ids = itertools.count(1)
        handler = type("Handler", (_Handler,), {"app": self})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            self.batcher.close()
            raise GorillaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.httpd.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "GorillaServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="gorilla-http",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=30)
            self._thread = None
        self.httpd.server_close()
        self.batcher.close()

    def __enter__(self) -> "GorillaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests -> GenRequests

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{uuid.uuid4().hex[:12]}"

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.backend.model_id, "object": "model",
                                            "created": self.created, "owned_by": "gorilla-jax"}]}

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.backend.model_id:
            raise RequestError(404, f"model '{model}' does not exist; this server serves "
                               f"'{self.backend.model_id}'", "model", "model_not_found")

    def build_requests(self, body: dict, chat: bool) -> list[GenRequest]:
        """Validate a request body and turn it into one GenRequest per choice."""
        _check_unsupported(body)
        self.check_model(body)
        if chat:
            prompts = [self.backend.chat_ids(_messages(body))]
            key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        else:
            prompts = [p if isinstance(p, list) else self.backend.encode(p) for p in _prompts(body)]
            key = "max_tokens"
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, f"'stream' must be true or false, got {stream!r}", "stream")
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise RequestError(400, f"'seed' must be an integer, got {seed!r}", "seed")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        stop = _stop(body)
        limit = self.backend.max_context
        vocab = self.backend.generator.config.vocab_size
        requests = []
        for i, ids in enumerate(prompts):
            if not ids:
                raise RequestError(400, "the prompt is empty (no tokens)", "prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise RequestError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
            room = limit - len(ids)
            max_tokens = body.get(key)
            if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
                raise RequestError(400, f"'{key}' must be a positive integer, got {max_tokens!r}", key)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                asked = max_tokens if max_tokens is not None else 1
                raise RequestError(400, f"this model's maximum context length is {limit} tokens; "
                                   f"the prompt has {len(ids)} tokens and {asked} more were "
                                   f"requested ({len(ids) + asked} in all): shorten the prompt or "
                                   f"reduce '{key}'", "messages" if chat else "prompt",
                                   "context_length_exceeded")
            if max_tokens is None:
                max_tokens = min(room, self.default_chat_tokens if chat else DEFAULT_COMPLETION_TOKENS)
            requests.append(GenRequest(list(ids), int(max_tokens), temperature, top_p, seed,
                                       stop, stream, index=i))
        return requests


def _collect(requests: list[GenRequest]) -> None:
    """Wait for every request to finish (non-streaming); raise on a generation error."""
    for r in requests:
        while True:
            kind, _, payload = r.events.get()
            if kind == "error":
                raise RequestError(500, payload, code="generation_failed")
            if kind == "done":
                break


class _Handler(BaseHTTPRequestHandler):
    app: GorillaServer  # set by GorillaServer
    protocol_version = "HTTP/1.1"
    server_version = "gorilla-jax"

    def log_message(self, fmt, *args) -> None:  # quiet by default: the logger, not stderr
        logger.info("%s - %s", self.address_string(), fmt % args)

    # ------------------------------------------------------------------ plumbing

    def _send_json(self, status: int, obj: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: RequestError) -> None:
        self._send_json(err.status, err.body())

    def _read_body(self) -> dict:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError(411, "chunked request bodies are not supported: send Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        n = int(length)
        if n > self.app.max_body_bytes:
            self.close_connection = True
            raise RequestError(413, f"request body of {n} bytes is larger than the limit of "
                               f"{self.app.max_body_bytes} bytes", code="request_too_large")
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(400, "the request body is not UTF-8") from None
        except json.JSONDecodeError as e:
            raise RequestError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno} "
                               f"column {e.colno})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    # ------------------------------------------------------------------ routes

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            self._send_json(200, self.app.models())
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            models = {m["id"]: m for m in self.app.models()["data"]}
            if name in models:
                self._send_json(200, models[name])
            else:
                self._error(RequestError(404, f"model '{name}' does not exist", "model", "model_not_found"))
        elif path == "/health":
            self._send_json(200, {"status": "ok", **self.app.batcher.stats()})
        elif path in ("/v1/completions", "/v1/chat/completions"):
            self._error(RequestError(405, f"{path} takes POST"))
        else:
            self._error(RequestError(404, f"no route {self.path}"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self._error(RequestError(404, f"no route {self.path}"))
            return
        chat = path == "/v1/chat/completions"
        try:
            body = self._read_body()
            requests = self.app.build_requests(body, chat)
        except RequestError as e:
            self._error(e)
            return
        except GorillaError as e:  # e.g. a chat template that fails to render these messages
            self._error(RequestError(400, str(e)))
            return
        for r in requests:
            self.app.batcher.submit(r)
        if requests[0].stream:
            self._stream(requests, chat)
            return
        try:
            _collect(requests)
        except RequestError as e:
            self._error(e)
            return
        self._send_json(200, self._final(requests, chat),
                        {"X-Batch-Size": max(r.batch_size for r in requests)})

    def _usage(self, requests: list[GenRequest]) -> dict:
        prompt = sum(len(r.prompt_ids) for r in requests)
        completion = sum(len(r.generated) for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _final(self, requests: list[GenRequest], chat: bool) -> dict:
        model = self.app.backend.model_id
        if chat:
            choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text},
                        "logprobs": None, "finish_reason": r.finish_reason} for r in requests]
            return {"id": self.app.new_id("chatcmpl"), "object": "chat.completion",
                    "created": int(time.time()), "model": model, "choices": choices,
                    "usage": self._usage(requests)}
        choices = [{"index": r.index, "text": r.text, "logprobs": None,
                    "finish_reason": r.finish_reason} for r in requests]
        return {"id": self.app.new_id("cmpl"), "object": "text_completion",
                "created": int(time.time()), "model": model, "choices": choices,
                "usage": self._usage(requests)}

    def _stream(self, requests: list[GenRequest], chat: bool) -> None:
        """Server-sent events: one chunk per round of new text, a final chunk per choice with
        its finish_reason, then ``data: [DONE]``."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        cid = self.app.new_id("chatcmpl" if chat else "cmpl")
        created, model = int(time.time()), self.app.backend.model_id
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: Optional[str], finish: Optional[str], first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else \
                    ({"content": text} if text is not None else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None,
                          "finish_reason": finish}
            return {"id": cid, "object": obj, "created": created, "model": model,
                    "choices": [choice]}

        def send(payload: str) -> bool:
            try:
                self.wfile.write(f"data: {payload}\n\n".encode("utf-8"))
                self.wfile.flush()
                return True
            except (BrokenPipeError, ConnectionResetError):
                return False

        if chat:
            for r in requests:
                send(json.dumps(chunk(r.index, None, None, first=True)))
        merged: queue.Queue = queue.Queue()
        pending = len(requests)
        pumps = [threading.Thread(target=_pump, args=(r.events, merged), daemon=True) for r in requests]
        for t in pumps:
            t.start()
        ok = True
        while pending:
            kind, index, payload = merged.get()
            if kind == "delta":
                ok = ok and send(json.dumps(chunk(index, payload, None)))
            elif kind == "done":
                pending -= 1
                ok = ok and send(json.dumps(chunk(index, None, payload)))
            else:
                pending -= 1
                ok = ok and send(json.dumps(RequestError(500, payload, code="generation_failed").body()))
        if ok:
            send("[DONE]")


def _pump(src: queue.Queue, dst: queue.Queue) -> None:
    """Forward one request's events to a shared queue until it is done."""
    while True:
        event = src.get()
        dst.put(event)
        if event[0] in ("done", "error"):
            return
