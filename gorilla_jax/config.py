"""The one configuration system: dataclass schema, YAML loading, dotted overrides, validation.

A config file is YAML with the sections ``model``, ``mesh``, ``data``, ``optimizer``, ``train``
and ``eval``. A file may name another with ``base: other.yaml`` (relative to itself); the
file's own keys are merged over the base's, section by section. Command-line overrides are
``section.key=value`` strings whose value is parsed as a YAML scalar (``train.steps=20``,
``model.rope_scaling.factor=8.0``, ``data.data_dir=null``).

Every unknown key and every value of the wrong type is a :class:`ConfigError` naming the key
and, when it came from a file, the file.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from gorilla_jax.errors import GorillaError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(GorillaError, ValueError):
    """A bad config file, key or value. The message names the key (and file)."""


@dataclass
class RopeScaling:
    """RoPE frequency scaling. ``type`` is "llama3" or "linear"."""

    type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    """A LLaMA-architecture decoder. Field names follow HF ``LlamaConfig`` where one exists."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = None
    initializer_range: float = 0.02
    param_dtype: str = "float32"  # dtype the parameters are stored (and updated) in
    dtype: str = "float32"  # compute dtype of matmuls and activations ("bfloat16" on TPU)
    remat: str = "none"  # none | full | dots | dots_no_batch: rematerialisation per layer
    scan_layers: bool = False  # one scanned layer body instead of N unrolled layers
    attention: str = "xla"  # xla (plain einsum softmax) | cudnn | splash: the kernel used

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class MeshConfig:
    """Device mesh axes. One of data/fsdp/tensor may be -1: it takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1  # data parallelism across slices (multi-slice over the data-centre network)


@dataclass
class DataConfig:
    data_dir: Optional[str] = None  # None: $GORILLA_JAX_DATA_DIR, else the embedded sample
    hub: str = "torchhub"  # huggingface | tensorflowhub | torchhub | all | custom
    apis: Optional[str] = None  # an API database (JSONL) for hub=custom
    tokenizer: Optional[str] = None  # tokenizer.model / tokenizer.json / HF dir
    seq_len: int = 512
    pack: bool = True
    truncation: str = "truncate"  # truncate (cut the prompt's start, then the response's end) | drop
    redraw_retrieval: bool = True  # draw each example's retrieval mode anew every epoch
    prompt_format: str = "gorilla"  # gorilla (###USER/###ASSISTANT) | chat (tokenizer template)
    retriever_probs: dict = field(default_factory=lambda: {"none": 0.5, "oracle": 0.5, "bm25": 0.0})
    top_k: int = 1
    shuffle_seed: int = 0
    shuffle_buffer: int = 10000
    skip_malformed: bool = False
    synthesize_from_docs: bool = False
    eval_fraction: float = 0.0  # held-out share of the train examples for the eval loss
    prefetch: int = 2


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    learning_rate: float = 2e-5
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    end_learning_rate_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Parameters whose path matches any of these regexes get no weight decay.
    weight_decay_exclude: list = field(default_factory=lambda: [r"norm", r"embed_tokens"])
    grad_clip: float = 1.0
    z_loss: float = 0.0


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # local path or gs:// URL
    steps: int = 100
    global_batch_size: int = 8
    micro_batches: int = 1  # gradient accumulation: the global batch is split into this many
    seed: int = 0
    init_from: Optional[str] = None  # None: random init; else an HF directory or a checkpoint
    log_every: int = 1
    eval_every: int = 0  # 0: never
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    profile_steps: list = field(default_factory=list)  # e.g. [5, 8]: trace steps 5..8
    # read each step's metrics only after the next step is dispatched (the host's batch work
    # overlaps the device's); null: on, except on CPU, where host and "device" share the cores
    async_metrics: Optional[bool] = None
    tensorboard: bool = True


@dataclass
class EvalConfig:
    hub: str = "torchhub"
    retriever: str = "oracle"  # none | oracle | bm25 | dense
    mode: str = "gorilla"  # gorilla | strict
    limit: Optional[int] = None
    max_new_tokens: int = 128
    batch_size: int = 8
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "model.attention": ("xla", "cudnn", "splash"),
    "model.rope_scaling.type": ("llama3", "linear"),
    "data.hub": ("huggingface", "tensorflowhub", "torchhub", "all", "custom"),
    "data.prompt_format": ("gorilla", "chat"),
    "data.truncation": ("truncate", "drop"),
    "optimizer.name": ("adamw",),
    "optimizer.schedule": ("cosine", "linear", "constant"),
    "eval.hub": ("huggingface", "tensorflowhub", "torchhub", "custom"),
    "eval.retriever": ("none", "oracle", "bm25", "dense"),
    "eval.mode": ("gorilla", "strict"),
}


# ----------------------------------------------------------------------------- building


def _unwrap_optional(tp):
    """Optional[X] -> (X, True); X -> (X, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}config key '{key}' may not be null")
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}config key '{key}' must be a mapping, got {value!r}")
        return _build(inner, value, key, where)
    origin = typing.get_origin(inner) or inner
    if origin is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}config key '{key}' must be true or false, got {value!r}")
    if origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}config key '{key}' must be an integer, got {value!r}")
    if origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}config key '{key}' must be a number, got {value!r}")
    if origin is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}config key '{key}' must be a string, got {value!r}")
    if origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{where}config key '{key}' must be a list, got {value!r}")
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}config key '{key}' must be a mapping, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            close = [k for k in known if k.startswith(str(name)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}unknown config key '{key}'{hint}")
        kwargs[name] = _coerce(value, hints[name], key, where)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A path as given, or a bare name looked up in configs/ (``tiny`` -> configs/tiny.yaml)."""
    p = Path(name)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"config file not found: {name}")


def load_yaml_tree(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML config file, following ``base:`` links, into one merged dict."""
    path = resolve_config_path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' links form a cycle")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{loc}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    base = tree.pop("base", None)
    if base is not None:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.exists():
            raise ConfigError(f"{path}: base config '{base}' not found")
        tree = _deep_merge(load_yaml_tree(base_path, _seen + (path,)), tree)
    return tree


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    tree = _deep_merge({}, tree)
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def from_dict(tree: dict, where: str = "") -> Config:
    cfg = _build(Config, tree, "", where)
    validate(cfg, where)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config file (or the defaults when path is None), apply overrides, validate."""
    tree = load_yaml_tree(path) if path is not None else {}
    where = f"{resolve_config_path(path)}: " if path is not None else ""
    if overrides:
        try:
            tree = apply_overrides(tree, overrides)
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
    return from_dict(tree, where)


def _get(cfg: Config, dotted: str):
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def validate(cfg: Config, where: str = "") -> None:
    def bad(key, msg):
        raise ConfigError(f"{where}config key '{key}' {msg}")

    for key, choices in _CHOICES.items():
        val = _get(cfg, key)
        if val is not None and val not in choices:
            bad(key, f"must be one of {', '.join(choices)}; got {val!r}")
    m = cfg.model
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        if getattr(m, key) <= 0:
            bad(f"model.{key}", f"must be positive; got {getattr(m, key)}")
    if m.num_attention_heads % m.num_key_value_heads:
        bad("model.num_key_value_heads",
            f"({m.num_key_value_heads}) must divide num_attention_heads ({m.num_attention_heads})")
    if m.head_dim is None and m.hidden_size % m.num_attention_heads:
        bad("model.hidden_size", f"({m.hidden_size}) must be divisible by num_attention_heads "
            f"({m.num_attention_heads}) unless head_dim is set")
    if m.resolved_head_dim % 2:
        bad("model.head_dim", f"must be even for rotary embeddings; got {m.resolved_head_dim}")
    sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    if sum(1 for v in sizes.values() if v == -1) > 1:
        bad("mesh", "may have at most one axis of size -1")
    for k, v in {**sizes, "dcn_data": cfg.mesh.dcn_data}.items():
        if v == 0 or v < -1:
            bad(f"mesh.{k}", f"must be a positive size or -1; got {v}")
    probs = cfg.data.retriever_probs
    for k, v in probs.items():
        if k not in ("none", "oracle", "bm25", "dense"):
            bad(f"data.retriever_probs.{k}", "is not a retriever (none, oracle, bm25, dense)")
        if not isinstance(v, (int, float)) or v < 0:
            bad(f"data.retriever_probs.{k}", f"must be a non-negative number; got {v!r}")
    if probs and abs(sum(probs.values()) - 1.0) > 1e-6:
        bad("data.retriever_probs", f"must sum to 1; got {sum(probs.values())}")
    if cfg.data.seq_len <= 0:
        bad("data.seq_len", "must be positive")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        bad("data.eval_fraction", "must be in [0, 1)")
    t = cfg.train
    if t.steps < 0:
        bad("train.steps", "must be >= 0")
    if t.global_batch_size <= 0:
        bad("train.global_batch_size", "must be positive")
    if t.micro_batches <= 0 or t.global_batch_size % t.micro_batches:
        bad("train.micro_batches",
            f"({t.micro_batches}) must be positive and divide train.global_batch_size "
            f"({t.global_batch_size})")
    if t.profile_steps and (len(t.profile_steps) != 2 or t.profile_steps[0] > t.profile_steps[1]):
        bad("train.profile_steps", f"must be [first, last]; got {t.profile_steps}")
    if cfg.optimizer.learning_rate < 0:
        bad("optimizer.learning_rate", "must be >= 0")
    if cfg.eval.limit is not None and cfg.eval.limit <= 0:
        bad("eval.limit", "must be positive")
    if not 0.0 < cfg.eval.top_p <= 1.0:
        bad("eval.top_p", "must be in (0, 1]")


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (saved with every run and checkpoint)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
