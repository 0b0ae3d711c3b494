"""Several processes, one run: JAX's distributed runtime, process-local batches, process 0 writes.

``initialize`` starts ``jax.distributed`` from explicit coordinator flags (``gamejax train
--coordinator_address=HOST:PORT --num_processes=N --process_id=I``) or, without them, from a
cluster JAX detects by itself (a multi-worker TPU VM slice, SLURM with several tasks), and does
nothing for one process. On CPU the processes' collectives go through gloo.

Every process runs the same loader (same seed, same position), restricted to the rows its devices
hold (``process_rows``; the loader reads only those rows' examples where rows are examples of their
own), and passes them to ``jax.make_array_from_process_local_data``; every process writes its
part of the checkpoints (orbax), only process 0 writes metrics, summary and config files.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np


class DistributedError(ValueError):
  """Coordinator settings missing, out of range or not the same on every process."""


def cluster_detected() -> str | None:
  """The kind of multi-process cluster this process runs in (None: none that JAX would join)."""
  if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_STEP_NUM_TASKS", "1")) or 1) > 1:
    return "SLURM"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return "TPU VM slice"
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if _tpu_chips() > 0 and not os.environ.get("TPU_SKIP_MDS_QUERY"):
    return "TPU VM"          # JAX reads its workers from the VM's metadata (one host: 1 process)
  return None


def _tpu_chips() -> int:
  """TPU chips attached to this host (0 when JAX cannot tell), read without starting a backend:
  ``jax.distributed.initialize`` must come before any."""
  try:
    from jax._src import hardware_utils
    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except Exception:  # noqa: BLE001 - a private helper of JAX: absent or changed means unknown
    return 0


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> str:
  """Joins the run's processes; returns what it did (for the log)."""
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  if any(v is not None for v in given.values()):
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
      raise DistributedError(f"{', '.join(missing)} missing: a multi-process run gives all of "
                             "--coordinator_address, --num_processes and --process_id")
    if ":" not in coordinator_address:
      raise DistributedError(f"--coordinator_address={coordinator_address!r}: expected HOST:PORT")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedError(f"--process_id={process_id} is not in [0, --num_processes="
                             f"{num_processes})")
    if num_processes == 1:
      return "one process"
    _use_gloo_on_cpu()
    try:
      jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                 initialization_timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - the runtime raises several kinds
      raise DistributedError(f"jax.distributed.initialize({coordinator_address!r}, "
                             f"num_processes={num_processes}, process_id={process_id}) failed: "
                             f"{type(e).__name__}: {e}") from e
    return f"process {process_id} of {num_processes} (coordinator {coordinator_address})"
  kind = cluster_detected()
  if kind is None:
    return "one process"
  _use_gloo_on_cpu()
  jax.distributed.initialize(initialization_timeout=timeout_s)
  return f"process {jax.process_index()} of {jax.process_count()} ({kind})"


def _use_gloo_on_cpu() -> None:
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0] in ("", "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def check_same_everywhere(what: str, text: str) -> None:
  """Raises ``DistributedError`` unless every process has the same ``text`` (e.g. the operative
  config): the processes of one run must play the same experiment."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
  every = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1)
  differ = [i for i, d in enumerate(every) if d != every[0]]
  if differ:
    raise DistributedError(f"the {what} of processes {differ} differs from process 0's: every "
                           "process of a run must be given the same gin files and bindings")


def process_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...], axis: int) -> slice:
  """The rows (along ``axis`` of a global ``shape``) this process's devices hold, as one slice."""
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows = index[axis]
    starts.append(rows.start or 0)
    stops.append(shape[axis] if rows.stop is None else rows.stop)
  begin, end = min(starts), max(stops)
  covered = np.zeros(end - begin, bool)
  for a, b in zip(starts, stops):
    covered[a - begin:b - begin] = True
  if not covered.all():
    raise DistributedError(f"this process's devices hold rows that are not contiguous along axis "
                           f"{axis}: {sorted(zip(starts, stops))}")
  return slice(begin, end)


def global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding, rows: int,
                 axis: int = 1) -> Any:
  """A batch of ``rows`` rows (along ``axis``) as arrays sharded over the mesh: on one process
  ``batch`` is all of it (``device_put``); on several, each process's ``batch`` holds the rows
  its devices hold (``process_rows``)."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)

  def one(x):
    shape = list(x.shape)
    shape[axis] = rows
    return jax.make_array_from_process_local_data(sharding, x, tuple(shape))
  return jax.tree.map(lambda v: one(np.asarray(v)), batch)


def on_every_host(tree: Any) -> Any:
  """``tree``'s arrays as full NumPy arrays on every process (evaluation runs on the host); on one
  process, as they are."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
  """Waits until every process reaches ``name`` (nothing on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
