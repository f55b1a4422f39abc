"""A training run directory used as a model: its config, checkpoint params, tokenizer, format.

``gorilla-jax train`` writes ``RUN_DIR/config.yaml`` (the resolved config) and Orbax
checkpoints under ``RUN_DIR/checkpoints/<step>/{state,data,config}`` (see
gorilla_jax.train.checkpoints). Evaluating a run needs only the parameters of one step, so
:func:`load_run_params` restores the ``params`` subtree of ``state`` alone (Orbax partial
restore): the optimizer state is never read.

The tokenizer of a run is, as in training (gorilla_jax.train.data): ``data.tokenizer``, else
the tokenizer next to ``train.init_from``, else ``RUN_DIR/tokenizer``. The prompt format the
run was trained with is ``data.prompt_format``; the evaluation runner reads it from here so a
run is always prompted the way it learnt.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

from gorilla_jax.errors import GorillaError

RUN_CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"


def is_run_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / RUN_CONFIG).is_file() and (p / CHECKPOINTS).is_dir()


def read_run_config(path: str | os.PathLike):
    """The resolved :class:`gorilla_jax.config.Config` a run was trained with."""
    from gorilla_jax.config import load_config

    p = Path(path)
    if not (p / RUN_CONFIG).is_file():
        raise GorillaError(f"{p}: not a training run directory (no {RUN_CONFIG})")
    return load_config(p / RUN_CONFIG)


def checkpoint_steps(path: str | os.PathLike) -> list[int]:
    """Steps with a complete checkpoint, ascending. Orbax writes a step under a temporary name
    and renames it when complete, so only all-digit names are complete steps."""
    root = Path(path) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(d.name) for d in root.iterdir()
                  if d.is_dir() and d.name.isdigit() and (d / "state").is_dir())


def load_run_params(path: str | os.PathLike, step: Optional[int] = None, *,
                    dtype: Optional[str] = None, mesh: Any = None,
                    scan_layers: bool = False) -> tuple[Any, Any]:
    """``(ModelConfig, params)`` of a run's checkpoint (default: the latest complete step).

    Without ``mesh`` the params land on the first device; with it they are placed by the
    sharding rules. ``dtype`` casts them (default: as stored).
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from gorilla_jax.checkpoint import orbax_path
    from gorilla_jax.model import stack_layers, unstack_layers

    p = Path(path)
    cfg = read_run_config(p)
    steps = checkpoint_steps(p)
    if not steps:
        raise GorillaError(f"{p}: the run has no complete checkpoint in {p / CHECKPOINTS}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise GorillaError(f"{p}: no checkpoint of step {step}; complete steps: {steps}")
    state_dir = orbax_path(p / CHECKPOINTS / str(step) / "state")
    model_cfg = cfg.model
    stored_scanned = model_cfg.scan_layers
    ckptr = ocp.PyTreeCheckpointer()
    try:
        meta = ckptr.metadata(state_dir).item_metadata.tree
        if "params" not in meta:
            raise GorillaError(f"{state_dir}: the checkpoint has no 'params'")
        param_meta = meta["params"]
        if mesh is not None:
            from gorilla_jax.sharding import param_shardings

            shardings = param_shardings(model_cfg, mesh)
        else:
            single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: single, param_meta)
        target_dtype = np.dtype(dtype) if dtype else None
        try:
            target = jax.tree.map(
                lambda m, s: jax.ShapeDtypeStruct(m.shape, target_dtype or m.dtype, sharding=s),
                param_meta, shardings)
        except ValueError as e:
            raise GorillaError(f"{state_dir}: the stored params do not match the run's "
                               f"model config: {e}") from None
        restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
            item={"params": target}, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target})))
    finally:
        ckptr.close()
    params = restored["params"]
    if stored_scanned and not scan_layers:
        params = unstack_layers(params, model_cfg.num_hidden_layers)
    elif scan_layers and not stored_scanned:
        params = stack_layers(params, model_cfg.num_hidden_layers)
    if dtype:
        model_cfg = dataclasses.replace(model_cfg, param_dtype=dtype)
    return dataclasses.replace(model_cfg, scan_layers=scan_layers), params


def run_tokenizer_path(path: str | os.PathLike) -> Optional[Path]:
    """The tokenizer a run trained with (see the module docstring), or None."""
    from gorilla_jax.tokenizer import find_tokenizer_file

    p = Path(path)
    cfg = read_run_config(p)
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    if cfg.train.init_from and find_tokenizer_file(Path(cfg.train.init_from)) is not None:
        return Path(cfg.train.init_from)
    return p / "tokenizer" if find_tokenizer_file(p / "tokenizer") is not None else None


def run_eos_ids(path: str | os.PathLike) -> list[int]:
    """EOS ids of a run: the model config's, and those of ``train.init_from``'s files."""
    cfg = read_run_config(path)
    ids = [cfg.model.eos_token_id] if cfg.model.eos_token_id is not None else []
    if cfg.train.init_from and Path(cfg.train.init_from).exists():
        from gorilla_jax.loading import model_eos_ids

        ids += [i for i in model_eos_ids(cfg.train.init_from) if i not in ids]
    return ids


def run_prompt_format(path: str | os.PathLike) -> str:
    return read_run_config(path).data.prompt_format
