"""Orbax checkpoints of model parameters (plus the model config), written atomically.

A *params checkpoint* (what ``gorilla-jax convert hf-to-flax`` writes and ``load_model`` reads)
is a directory::

    CKPT/
      gorilla_jax.json     marker: {"format": "gorilla-jax-params", "version": 1, ...}
      model_config.yaml    the ModelConfig (HF LlamaConfig field names), see gorilla_jax.config
      params/              Orbax StandardCheckpointer tree: the unscanned param tree
                           (embed_tokens/embedding, layers_i/..., norm/scale, lm_head/kernel)
      tokenizer.model | tokenizer.json, tokenizer_config.json, ...   (optional, copied)

Parameters are always stored unscanned (``layers_0 .. layers_{L-1}``), so a checkpoint does not
depend on ``scan_layers``; :func:`load_params` stacks them when asked. Restoring may cast to
another dtype and place arrays straight onto a mesh (``shardings``), without a host copy of the
whole model per device.

Every directory here is written under a temporary sibling name and renamed into place when
complete (:func:`atomic_output_dir`): an interrupted or failed write leaves nothing at the
destination.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from gorilla_jax.config import ConfigError, ModelConfig, from_dict
from gorilla_jax.errors import GorillaError

MARKER = "gorilla_jax.json"
CONFIG_FILE = "model_config.yaml"
PARAMS_DIR = "params"


def orbax_path(path) -> Any:
    """``path`` as Orbax takes it: local paths made absolute (Orbax rejects relative ones),
    URLs such as ``gs://bucket/run`` unchanged (as strings)."""
    text = str(path)
    return text if "://" in text else Path(os.path.abspath(text))
FORMAT = "gorilla-jax-params"
VERSION = 1


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``path`` when the block succeeds.

    ``path`` must not exist (or be an empty directory) unless ``overwrite``; on any exception
    the temporary directory is removed and ``path`` is untouched.
    """
    out = Path(path)
    if out.exists() and not overwrite:
        if not out.is_dir() or any(out.iterdir()):
            raise GorillaError(f"{out}: output already exists; remove it or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_config_to_dict(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def model_config_from_dict(values: dict, where: str = "") -> ModelConfig:
    """A ModelConfig from a plain dict, validated like the ``model`` section of a config file."""
    return from_dict({"model": values}, f"{where}: " if where else "").model


def is_params_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored in a params checkpoint directory."""
    path = Path(path)
    if not is_params_checkpoint(path):
        raise GorillaError(f"{path}: not a gorilla-jax params checkpoint (no {MARKER})")
    cfg_path = path / CONFIG_FILE
    try:
        values = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GorillaError(f"{cfg_path}: missing model config") from None
    except yaml.YAMLError as e:
        raise GorillaError(f"{cfg_path}: invalid YAML: {e}") from None
    if not isinstance(values, dict):
        raise GorillaError(f"{cfg_path}: expected a mapping of ModelConfig fields")
    try:
        return model_config_from_dict(values, str(cfg_path))
    except ConfigError as e:
        raise GorillaError(str(e)) from None


def write_params_dir(directory: Path, params: Any, config: ModelConfig,
                     extra: Optional[dict] = None) -> None:
    """Write params + config + marker into an existing (temporary) directory."""
    import jax
    import orbax.checkpoint as ocp

    if "layers" in params:  # stored unscanned: see the module docstring
        from gorilla_jax.model import unstack_layers

        params = unstack_layers(params, config.num_hidden_layers)
    # Bound the bytes being serialised at once (jax array leaves): with the tree itself that
    # keeps the host near one copy of the model. Uncompressed: weights barely compress.
    sizes = [x.size * x.dtype.itemsize for x in jax.tree.leaves(params)]
    inflight = max(max(sizes), sum(sizes) // 16, 1 << 20)
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=(inflight + (1 << 20)) / 1e9,
                                          use_compression=False)
    ckptr = ocp.Checkpointer(handler)
    try:
        ckptr.save(orbax_path(directory / PARAMS_DIR), args=ocp.args.PyTreeSave(params))
    finally:
        ckptr.close()
    stored = dataclasses.replace(config, scan_layers=False)
    (directory / CONFIG_FILE).write_text(
        yaml.safe_dump(model_config_to_dict(stored), sort_keys=False), encoding="utf-8")
    marker = {"format": FORMAT, "version": VERSION, **(extra or {})}
    (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def save_params(path: str | os.PathLike, params: Any, config: ModelConfig, *,
                extra: Optional[dict] = None, overwrite: bool = False) -> Path:
    """Save a param tree (numpy or jax arrays, scanned or not) and its config at ``path``."""
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        write_params_dir(tmp, params, config, extra)
    return Path(path)


def load_params(path: str | os.PathLike, config: Optional[ModelConfig] = None, *,
                dtype: Optional[str] = None, shardings: Any = None,
                scan_layers: Optional[bool] = None) -> tuple[ModelConfig, Any]:
    """Restore ``(config, params)`` from a params checkpoint.

    - ``config``: expected config (default: the stored one); the stored tensor shapes must match.
    - ``dtype``: cast the parameters (e.g. "bfloat16"); default: as stored. The returned config's
      ``param_dtype`` says what was restored.
    - ``shardings``: a tree of ``jax.sharding.Sharding`` matching the (unscanned) params, or a
      single sharding for all: arrays are restored directly onto those devices. Without it the
      leaves are host numpy arrays.
    - ``scan_layers``: return the scanned layout (default: ``config.scan_layers``).
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    path = Path(path)
    stored_cfg = read_model_config(path)
    cfg = config if config is not None else stored_cfg
    if dtype is not None:
        cfg = dataclasses.replace(cfg, param_dtype=dtype)
    ckptr = ocp.StandardCheckpointer()
    try:
        meta = ckptr.metadata(orbax_path(path / PARAMS_DIR)).item_metadata.tree
        target_dtype = np.dtype(cfg.param_dtype) if dtype is not None else None
        if isinstance(shardings, jax.sharding.Sharding):
            shardings = jax.tree.map(lambda _: shardings, meta)

        _check_shapes(path, meta, cfg)
        if shardings is None:
            # numpy targets: restored as host arrays (cast on read when dtype is given).
            target = jax.tree.map(lambda m: np.empty(m.shape, target_dtype or m.dtype), meta)
        else:
            try:
                target = jax.tree.map(
                    lambda m, s: jax.ShapeDtypeStruct(m.shape, target_dtype or m.dtype, sharding=s),
                    meta, shardings)
            except ValueError as e:
                raise GorillaError(f"{path}: shardings do not match the stored param tree: {e}") from None
        params = ckptr.restore(orbax_path(path / PARAMS_DIR), target)
    finally:
        ckptr.close()
    want_scan = cfg.scan_layers if scan_layers is None else scan_layers
    if want_scan:
        from gorilla_jax.model import stack_layers

        params = stack_layers(params, cfg.num_hidden_layers)
    return dataclasses.replace(cfg, scan_layers=want_scan), params


def _check_shapes(path: Path, meta: Any, config: ModelConfig) -> None:
    """The stored tree must be the unscanned tree of ``config`` (names and shapes)."""
    import jax

    from gorilla_jax.model import abstract_params

    expected = abstract_params(dataclasses.replace(config, scan_layers=False))
    def flat(tree):
        return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(v.shape)
                for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    flat_exp, flat_got = flat(expected), flat(meta)
    for key, shape in flat_exp.items():
        if key not in flat_got:
            raise GorillaError(f"{path}: checkpoint lacks parameter {key}")
        if tuple(flat_got[key]) != tuple(shape):
            raise GorillaError(f"{path}: parameter {key} has shape {flat_got[key]}, the config "
                               f"expects {tuple(shape)}")
    extra = sorted(set(flat_got) - set(flat_exp))
    if extra:
        raise GorillaError(f"{path}: checkpoint has parameters the config does not: "
                           f"{', '.join(extra[:3])}")
