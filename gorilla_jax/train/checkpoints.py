"""Training checkpoints with Orbax: train state, data-pipeline position and resolved config.

Layout under ``RUN_DIR/checkpoints`` (RUN_DIR may be a gs:// URL)::

    <step>/state/    params, optimizer state, step and RNG (sharded arrays, OCDBT/tensorstore)
    <step>/data/     the pipeline position (JSON), so a resumed run sees the same batches
    <step>/config/   the resolved config (JSON)

Orbax writes each step into a temporary directory and renames it when the save is complete, so
a run killed during a save (even ``kill -9``) leaves only earlier, complete steps visible;
:meth:`RunCheckpointer.latest_step` never returns an incomplete one. Saves are asynchronous:
the train loop goes on while the arrays are written. Restoring takes an abstract state whose
leaves carry the target shardings, so a checkpoint saved on one mesh restores onto another.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from gorilla_jax.checkpoint import orbax_path

log = logging.getLogger(__name__)


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


class RunCheckpointer:
    def __init__(self, run_dir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = str(orbax_path(_join(str(run_dir), "checkpoints")))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config"))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_position: dict, config: dict, *,
             force: bool = False) -> bool:
        """Start saving ``state`` at ``step`` (asynchronously when enabled)."""
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_position),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data position, config) of ``step``, placed as ``abstract_state`` says."""
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["data"]), dict(out["config"])

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
