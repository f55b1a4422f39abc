"""Batched generation with the KV cache: left-padded prompts, EOS / stop strings, greedy or sampled.

::

    gen = Generator(params, config, pad_id=0)            # keeps compiled functions
    new_ids = gen.generate(prompts, max_new_tokens=64, eos_ids=[2])
    new_ids = generate(params, config, prompts, 64, temperature=0.7, top_p=0.9, seed=1)

How it runs: prompts are left-padded to a bucketed length P (a power of two, at least 16) and
the batch to a bucketed size B (a power of two, a multiple of the mesh's data-parallel size);
the cache holds P + N slots with N the bucketed ``max_new_tokens`` (on CPU it grows to them
in ``cache_windows`` steps, see :class:`Generator`). One jitted *prefill* call runs the whole
prompt and samples the first token; one jitted *decode* call then runs a ``lax.while_loop``
over single-token steps until every sequence has stopped, the step limit is reached or the
cache needs to grow. Each (B, P, N, sampling mode) is compiled once (the decode once per cache
size); prompts of other lengths in the same bucket reuse it. Positions are per sequence
(``cumsum(mask) - 1``), so a left-padded prompt generates exactly what it would alone.

Outputs: per prompt, the new token ids, including the EOS token that stopped it (as HF's
``generate`` does). Stop strings need ``decode_fn`` (token ids -> text): decoding then runs in
chunks of ``stop_check_every`` steps and after each chunk the host checks the text; a sequence
whose text contains a stop string is cut after the token that completed it.

Sampling: ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by the
temperature and, with ``top_p < 1``, restricted to the smallest set of most likely tokens whose
probability reaches ``top_p`` (nucleus). Results are reproducible for a given seed and batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gorilla_jax.config import ModelConfig
from gorilla_jax.errors import GorillaError
from gorilla_jax.model import LlamaForCausalLM, cache_logical_axes, init_cache, unstack_layers
from gorilla_jax.model.decode_layout import decode_layout_default, to_decode_layout
from gorilla_jax.model.llama import CACHE_LAYOUT
from gorilla_jax.sharding import (activate, batch_sharding, logical_to_spec, param_shardings,
                                  with_logical_constraint)

# On CPU the decode reads the KV cache in cache_windows growing sizes (see Generator): one decode
# compile per size, for less cache read per step (a quarter less for 64 prompt + 128 new tokens).
_CPU_CACHE_WINDOWS = 4
_EOS_SLOTS = 8  # eos ids are passed as a fixed-size array (-1 = unused) so they never recompile


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def _nucleus(logits, top_p):
    """Mask logits outside the top-p nucleus to -inf (the most likely token is always kept)."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_tokens(logits, key, temperature, top_p, mode: str):
    """Next tokens [B] from logits [B, V]. mode: 'greedy' | 'sample' | 'nucleus' (static)."""
    if mode == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    if mode == "nucleus":
        logits = _nucleus(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generator:
    """Batched KV-cache generation for one model; compiled functions are kept across calls.

    ``mesh``: optional; parameters are placed by the sharding rules and the batch is sharded
    over the data-parallel axes (the batch bucket is rounded to a multiple of their size).
    ``max_batch``: larger prompt lists are generated in batches of at most this size.
    ``decode_layout``: keep the projection kernels in the decode layout (a transposed, fused
    copy; gorilla_jax/model/decode_layout.py), faster on CPU. Default: on CPU without a
    multi-device mesh.
    ``cache_windows``: the cache grows in this many steps instead of holding all P + N slots
    from the start. The prefill allocates P + W slots (W = N / cache_windows, rounded up to a
    multiple of 16) and the decode pads the cache by W more slots whenever the next token
    needs them, so each decode step attends over (and reads) only the slots allocated so far.
    Each cache size is one more decode compile, and growing briefly holds the old and the new
    cache together. Default: 4 on CPU (where reading the cache is a sizeable part of a decode
    step), 1 elsewhere (compiles cost more and device memory is tight).
    """

    def __init__(self, params, config: ModelConfig, *, mesh=None, pad_id: int = 0,
                 cache_dtype=None, max_batch: Optional[int] = None, min_prompt_bucket: int = 16,
                 min_new_bucket: int = 16, decode_layout: Optional[bool] = None,
                 cache_windows: Optional[int] = None):
        if config.scan_layers:  # decode runs unrolled: per-layer caches update in place
            params = unstack_layers(params, config.num_hidden_layers)
            config = dataclasses.replace(config, scan_layers=False)
        self.config = config
        self.mesh = mesh
        self.pad_id = int(pad_id)
        self.cache_dtype = cache_dtype
        self.max_batch = max_batch
        self.min_prompt_bucket = min_prompt_bucket
        self.min_new_bucket = min_new_bucket
        self.model = LlamaForCausalLM(config)
        if decode_layout is None:
            decode_layout = decode_layout_default(mesh)
        if decode_layout and mesh is not None and mesh.devices.size > 1:
            raise GorillaError("decode_layout=True works without a mesh or with a one-device mesh "
                               f"(the layout has no sharding rules); this mesh has "
                               f"{mesh.devices.size} devices")
        if mesh is not None:
            params = jax.device_put(params, param_shardings(config, mesh))
        self.decode_layout = bool(decode_layout)
        if cache_windows is None:
            cache_windows = _CPU_CACHE_WINDOWS if jax.default_backend() == "cpu" else 1
        if int(cache_windows) < 1:
            raise GorillaError(f"cache_windows must be >= 1 (1 = allocate the whole cache at "
                               f"once); got {cache_windows}")
        self.cache_windows = int(cache_windows)
        self.params = to_decode_layout(params, config) if decode_layout else params
        self._fns: dict[tuple, tuple[Callable, Callable, Callable]] = {}  # prefill, decode, grow
        self._data_size = 1
        if mesh is not None:
            spec = logical_to_spec(("batch",), mesh)
            axes = spec[0] if len(spec) else None
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            self._data_size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

    @property
    def compiled_shapes(self) -> list[tuple]:
        """The (batch, prompt length, new-token bucket, mode) shapes compiled so far."""
        return list(self._fns)

    # ------------------------------------------------------------------ compiled functions

    def _build(self, B: int, P: int, N: int, mode: str):
        cfg, model, pad_id = self.config, self.model, self.pad_id
        T = P + self._window(N)
        cache_axes = cache_logical_axes(cfg)

        def constrain_cache(cache):
            return jax.tree.map(lambda x, names: with_logical_constraint(x, names) if names else x,
                                cache, cache_axes, is_leaf=lambda x: isinstance(x, tuple)
                                and all(isinstance(n, str) for n in x))

        def is_eos(tok, eos):
            return jnp.any(tok[:, None] == eos[None, :], axis=-1)

        def prefill(params, ids, mask, row_valid, eos, key, temperature, top_p):
            cache = constrain_cache(init_cache(cfg, B, T, self.cache_dtype))
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
            logits, cache = model.apply({"params": params}, ids, positions=positions,
                                        attention_mask=mask, cache=cache, last_only=True)
            tok = sample_tokens(logits[:, 0], jax.random.fold_in(key, 0), temperature, top_p, mode)
            out = jnp.full((B, N), -1, jnp.int32).at[:, 0].set(tok)
            return {"cache": constrain_cache(cache), "tok": tok,
                    "pos": jnp.sum(mask, axis=1).astype(jnp.int32),
                    "done": is_eos(tok, eos) | ~row_valid, "out": out,
                    "step": jnp.ones((), jnp.int32)}

        def decode(params, state, until, eos, key, temperature, top_p):
            def cond(s):
                return (s["step"] < until) & ~jnp.all(s["done"])

            def body(s):
                logits, cache = model.apply({"params": params}, s["tok"][:, None],
                                            positions=s["pos"][:, None], cache=s["cache"])
                tok = sample_tokens(logits[:, 0], jax.random.fold_in(key, s["step"]),
                                    temperature, top_p, mode)
                tok = jnp.where(s["done"], pad_id, tok)
                out = jax.lax.dynamic_update_slice(
                    s["out"], jnp.where(s["done"], -1, tok)[:, None], (0, s["step"]))
                return {"cache": constrain_cache(cache), "tok": tok, "pos": s["pos"] + 1,
                        "done": s["done"] | is_eos(tok, eos), "out": out, "step": s["step"] + 1}

            return jax.lax.while_loop(cond, body, state)

        def grow(state, slots):
            cache = dict(state["cache"])
            for kind, axes in CACHE_LAYOUT.items():
                axis = axes.index("cache_length")
                widths = [(0, 0)] * len(axes)
                widths[axis] = (0, slots)
                cache[kind] = tuple(jnp.pad(x, widths) for x in cache[kind])
            cache["mask"] = jnp.pad(cache["mask"], ((0, 0), (0, slots)))
            return {**state, "cache": constrain_cache(cache)}

        return (jax.jit(prefill), jax.jit(decode, donate_argnums=(1,)),
                jax.jit(grow, static_argnums=1))

    def _window(self, N: int) -> int:
        """Cache slots added per window: N / cache_windows, rounded up to a multiple of 16."""
        return min(N, -(-N // (16 * self.cache_windows)) * 16)

    def _get_fns(self, B, P, N, mode):
        key = (B, P, N, mode)
        if key not in self._fns:
            self._fns[key] = self._build(B, P, N, mode)
        return self._fns[key]

    # ------------------------------------------------------------------ public

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 eos_ids: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop_strings: Sequence[str] = (),
                 decode_fn: Optional[Callable[[list[int]], str]] = None,
                 stop_check_every: int = 16) -> list[list[int]]:
        """New token ids for each prompt (see the module docstring)."""
        prompts = [list(map(int, p)) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise GorillaError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
            bad = [t for t in p if not 0 <= t < self.config.vocab_size]
            if bad:
                raise GorillaError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                                   f"(vocab_size={self.config.vocab_size})")
        if max_new_tokens <= 0 or not prompts:
            return [[] for _ in prompts]
        if temperature < 0 or not 0 < top_p <= 1:
            raise GorillaError(f"temperature must be >= 0 and top_p in (0, 1]; got "
                               f"temperature={temperature}, top_p={top_p}")
        eos_ids = [int(e) for e in eos_ids]
        if len(eos_ids) > _EOS_SLOTS:
            raise GorillaError(f"at most {_EOS_SLOTS} eos ids are supported; got {len(eos_ids)}")
        if stop_strings and decode_fn is None:
            raise GorillaError("stop_strings need a decode_fn (token ids -> text)")
        step = self.max_batch or len(prompts)
        out: list[list[int]] = []
        for start in range(0, len(prompts), step):
            out.extend(self._generate_batch(
                prompts[start:start + step], max_new_tokens, eos_ids, float(temperature),
                float(top_p), seed, list(stop_strings), decode_fn, stop_check_every))
        return out

    def _generate_batch(self, prompts, max_new, eos_ids, temperature, top_p, seed, stop_strings,
                        decode_fn, stop_check_every):
        n = len(prompts)
        B = bucket(n)
        if B % self._data_size:
            B = -(-B // self._data_size) * self._data_size
        P = bucket(max(len(p) for p in prompts), self.min_prompt_bucket)
        N = bucket(max_new, self.min_new_bucket)
        mode = "greedy" if temperature == 0 else ("nucleus" if top_p < 1 else "sample")
        prefill, decode, grow = self._get_fns(B, P, N, mode)

        ids = np.full((B, P), self.pad_id, np.int32)
        mask = np.zeros((B, P), np.int32)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = p
            mask[i, P - len(p):] = 1
        mask[n:, -1] = 1  # batch-padding rows: one dummy token each, marked done from the start
        row_valid = np.arange(B) < n
        eos = np.full((_EOS_SLOTS,), -1, np.int32)
        eos[:len(eos_ids)] = eos_ids
        key = jax.random.PRNGKey(seed)
        temp, topp = np.float32(temperature), np.float32(top_p)

        ctx = activate(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with ctx:
            if self.mesh is not None:
                shard = batch_sharding(self.mesh, 2, shape=(B, P))
                ids, mask = jax.device_put(ids, shard), jax.device_put(mask, shard)
                row_valid = jax.device_put(row_valid, batch_sharding(self.mesh, 1, shape=(B,)))
            state = prefill(self.params, ids, mask, row_valid, eos, key, temp, topp)
            chunk = stop_check_every if stop_strings else max_new
            cut: dict[int, int] = {}
            step = 1
            window = self._window(N)  # cache slots after the prompt
            while step < max_new:
                if step > window:  # step s writes slot P + s - 1: make room for the next window
                    slots = min(self._window(N), N - window)
                    state = grow(state, slots)
                    window += slots
                until = min(step + chunk, max_new, window + 1)
                state = decode(self.params, state, np.int32(until), eos, key, temp, topp)
                step = int(state["step"])
                if stop_strings:
                    done = self._check_stops(np.asarray(state["out"]), n, stop_strings,
                                             decode_fn, cut)
                    if done.any():
                        state["done"] = jnp.logical_or(state["done"], jnp.asarray(
                            np.pad(done, (0, B - n))).reshape(state["done"].shape))
                if bool(np.all(np.asarray(state["done"]))):
                    break
            out = np.asarray(state["out"])
        if stop_strings:
            self._check_stops(out, n, stop_strings, decode_fn, cut)
        results = []
        for i in range(n):
            row = out[i, :max_new]
            toks = row[:np.argmax(row < 0)] if (row < 0).any() else row
            results.append([int(t) for t in toks[:cut.get(i, len(toks))]])
        return results

    @staticmethod
    def _check_stops(out, n, stop_strings, decode_fn, cut) -> np.ndarray:
        """Record in ``cut`` where each sequence's text first contains a stop string."""
        done = np.zeros(n, bool)
        for i in range(n):
            if i in cut:
                done[i] = True
                continue
            row = out[i]
            toks = [int(t) for t in (row[:np.argmax(row < 0)] if (row < 0).any() else row)]
            text = decode_fn(toks)
            if not any(s in text for s in stop_strings):
                continue
            for k in range(1, len(toks) + 1):  # the first prefix that completes a stop string
                if any(s in decode_fn(toks[:k]) for s in stop_strings):
                    cut[i] = k
                    break
            done[i] = True
        return done


def generate(params, config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, eos_ids: Sequence[int] = (), temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, pad_id: int = 0, mesh=None, stop_strings: Sequence[str] = (),
             decode_fn: Optional[Callable[[list[int]], str]] = None,
             cache_windows: Optional[int] = None) -> list[list[int]]:
    """One-off batched generation (builds a :class:`Generator`; keep one for repeated calls)."""
    gen = Generator(params, config, mesh=mesh, pad_id=pad_id, cache_windows=cache_windows)
    return gen.generate(prompts, max_new_tokens, eos_ids=eos_ids, temperature=temperature,
                        top_p=top_p, seed=seed, stop_strings=stop_strings, decode_fn=decode_fn)
