"""Train-state checkpoints: an Orbax CheckpointManager over MODEL_DIR/checkpoints/<step>/ holding
params (the layout geex_jax.model.checkpoints reads), opt_state and data_state, the input
pipeline's state of every process (gathered as JSON), so a resumed run is bit-exact."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from geex_jax.errors import CheckpointError
from geex_jax.model import checkpoints
from geex_jax.training.state import abstract_with_shardings
from geex_jax.training.step import TrainState


def make_manager(model_dir, keep: int, async_save: bool):
  """model_dir: an epath.Path from fileio.as_path (absolute local, or gs://)."""
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    enable_async_checkpointing=async_save,
    create=True,
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
    model_dir / checkpoints.CHECKPOINTS_SUBDIR,
    options=options,
    item_names=(checkpoints.PARAMS_ITEM, "opt_state", "data_state"),
  )


def close_manager(manager) -> None:
  """manager.close(), and also waiting for the stale-temp-directory cleanup it starts when
  created (close() does not: a run that fails right away would exit under that thread, which
  then prints a traceback). Orbax has no public call for that wait; without it, only the noise
  returns."""
  await_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
  if await_cleanup is not None:
    await_cleanup()
  manager.close()


def _gather_data_states(state: dict) -> list[dict]:
  """Every process's data iterator state (each host reads different documents)."""
  if jax.process_count() == 1:
    return [state]
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: raw.size] = raw
  allraw = multihost_utils.process_allgather(padded)
  return [
    json.loads(bytes(allraw[i][: int(lengths[i][0])]).decode()) for i in range(jax.process_count())
  ]


def save(manager, state: TrainState, data_state: dict, step: int) -> None:
  import orbax.checkpoint as ocp

  states = _gather_data_states(data_state)
  manager.save(
    step,
    args=ocp.args.Composite(
      **{
        checkpoints.PARAMS_ITEM: ocp.args.StandardSave(state.params),
        "opt_state": ocp.args.StandardSave(state.opt_state),
        "data_state": ocp.args.JsonSave(
          {"step": step, "process_count": len(states), "states": states}
        ),
      }
    ),
    force=True,
  )


def restore(
  manager, step: int, shapes: TrainState, shardings: TrainState
) -> tuple[TrainState, dict]:
  import orbax.checkpoint as ocp

  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        **{
          checkpoints.PARAMS_ITEM: ocp.args.StandardRestore(
            abstract_with_shardings(shapes.params, shardings.params)
          ),
          "opt_state": ocp.args.StandardRestore(
            abstract_with_shardings(shapes.opt_state, shardings.opt_state)
          ),
          "data_state": ocp.args.JsonRestore(),
        }
      ),
    )
  except Exception as e:  # orbax raises many types for a damaged or mismatched checkpoint
    raise CheckpointError(
      f"cannot resume from step {step} in {manager.directory}: "
      f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    ) from None
  data = restored["data_state"]
  if data["process_count"] != jax.process_count():
    raise CheckpointError(
      f"checkpoint step {step} was written by {data['process_count']} "
      f"processes; this run has {jax.process_count()} (data states differ)"
    )
  step_arr = jax.device_put(jnp.asarray(step, jnp.int32), shardings.step)
  state = TrainState(step_arr, restored[checkpoints.PARAMS_ITEM], restored["opt_state"])
  return state, data["states"][jax.process_index()]
