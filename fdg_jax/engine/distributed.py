"""Multi-process runs on JAX's own distributed runtime.

Processes join with `jax.distributed.initialize`; from then on `jax.devices()` lists every
process's devices and each process runs only the stages on its own (the engine's executor).
What crosses processes goes through JAX: stage-to-stage arrays by cross-process
`jax.device_put` (native on GPU and TPU; on CPU over the transfer server that
`jax_cross_host_transfer_socket_address` starts), and the few host values every process needs
(metrics, finiteness, checkpoint steps) through the key-value store of JAX's coordination
service (`exchange_json`), not device collectives: on CPU, a process waiting in a gloo collective
serves the transfers it owes the others at about one per 1.8 s, so a process that reached a
collective first starved the one still receiving its activations, and gloo gave up after 30 s
(`tests/test_multiprocess.py::test_host_values_do_not_hold_up_pending_transfers`).
Preemption: a SIGTERM to any process reaches every process through JAX's preemption service,
and all stop at the same iteration (`reached_preemption_sync_point`).
"""

import itertools
import json
import os
import socket
import sys
import time
from typing import Optional, Sequence

import jax
from jax._src import distributed as jax_distributed   # the coordination service's client
import numpy as np

# How long a process waits for the others' host values: as long as the slowest process may
# take to reach the same point (an evaluation, a checkpoint). A process that dies ends the run
# sooner: the coordination service stops every process when one misses its heartbeats.
EXCHANGE_TIMEOUT_S = 3600
_exchange_count = itertools.count()   # every process makes the same exchanges in the same order


class DistributedError(RuntimeError):
  """The processes could not join, or disagree; the message says what to check."""


def local_address_towards(host: str) -> str:
  """This host's address on the interface that reaches `host` (127.0.0.1 for a local run)."""
  if host in ('localhost', '127.0.0.1', '::1'):
    return '127.0.0.1'
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
    probe.connect((host, 9))   # UDP: no packet is sent, only a route chosen
    return probe.getsockname()[0]


# Runs in a child before the real module: the affinity is set before any thread starts (so
# every thread inherits it) and exec keeps the pid, which the parent signals and waits for.
_PINNED_START = ('import os, sys; os.sched_setaffinity(0, {cores}); '
                 "os.execv(sys.executable, [sys.executable, '-m', *sys.argv[1:]])")


def module_command(module: str, args: list[str], cores: Optional[list[int]] = None) -> list[str]:
  """`python -m module args` (a process of a local run), pinned to `cores` (if given) before it
  starts any thread."""
  if cores is None:
    return [sys.executable, '-m', module, *args]
  return [sys.executable, '-c', _PINNED_START.format(cores=list(cores)), module, *args]


def free_port(address: str) -> int:
  """A port free on `address` now (another program could still take it before it is bound)."""
  with socket.socket() as probe:
    probe.bind((address, 0))
    return probe.getsockname()[1]


def _wait_for_coordinator(address: str, process_id: int, timeout_s: float) -> None:
  host, port = address.rsplit(':', 1)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise DistributedError(
            f'Process {process_id} could not join the run at coordinator {address} within '
            f'{timeout_s} s ({e}). Check that process 0 is running, that the address and port '
            'are reachable from this host, and that every process got the same '
            '--num_processes.') from e
      time.sleep(0.5)


def cluster_detected() -> bool:
  """Whether this process was started as one of several by a cluster launcher JAX knows."""
  return any(int(os.environ.get(name, '1') or 1) > 1
             for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'PMI_SIZE'))


def initialize(coordinator_address: Optional[str], num_processes: Optional[int],
               process_id: Optional[int], *, timeout_s: int = 120,
               heartbeat_timeout_s: int = 30) -> None:
  """Join the run: explicit coordinator, process count and id, or (all None) what JAX detects
  from the cluster environment (Slurm, Open MPI, TPU pods). Call before any JAX computation."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is None for v in explicit) and any(v is not None for v in explicit):
    raise DistributedError('Give --coordinator_address, --num_processes and --process_id '
                           'together (or none, to let JAX detect a cluster environment).')
  if num_processes == 1 or (num_processes is None and not cluster_detected()):
    return   # one process: nothing to join
  host = (coordinator_address or '').rsplit(':', 1)[0] or socket.gethostname()
  if coordinator_address and process_id:
    # JAX aborts the process (no Python exception) when the coordinator never answers: see
    # first that it listens, and fail with a message that says what to check.
    _wait_for_coordinator(coordinator_address, process_id, timeout_s)
  # CPU devices have no native cross-process transfers: JAX's transfer server does them. Its
  # address is announced to the peers as given, so it needs a real port (0 is not resolved).
  address = local_address_towards(host)
  jax.config.update('jax_cross_host_transfer_socket_address', f'{address}:{free_port(address)}')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedError(
        f'Process {process_id} could not join the run at coordinator {coordinator_address} '
        f'within {timeout_s} s ({type(e).__name__}: {" ".join(str(e).split())[:300]}). Check '
        'that process 0 is running, that the address and port are reachable from this host, '
        'and that every process got the same --num_processes.') from e


def process_of(sharding: jax.sharding.Sharding) -> int:
  """The first process that owns devices of `sharding` (the one that speaks for a stage)."""
  return min(d.process_index for d in sharding.device_set)


def processes_of(sharding: jax.sharding.Sharding) -> frozenset[int]:
  return frozenset(d.process_index for d in sharding.device_set)


def put(value, sharding: jax.sharding.Sharding):
  """`jax.device_put(value, sharding)` of host or local values that every process owning part
  of `sharding` holds in full (the same numbers everywhere): each process places only the
  shards of its own devices, so `sharding` may span processes."""
  if sharding.is_fully_addressable:
    return jax.device_put(value, sharding)
  def place(leaf):
    if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
      return leaf
    leaf = np.asarray(leaf)
    return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])
  return jax.tree_util.tree_map(place, value)


def fetch(tree):
  """`jax.device_get(tree)` where every array is fully replicated over its devices (metrics,
  stage parameters): each process reads its own copy, also of arrays that span processes."""
  def get(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      if not leaf.sharding.is_fully_replicated:
        raise DistributedError(f'fetch() of an array split across processes ({leaf.sharding}).')
      return np.asarray(leaf.addressable_data(0))
    return jax.device_get(leaf)
  return jax.tree_util.tree_map(get, tree)


def exchange_json(value, sources: Optional[Sequence[int]] = None) -> list:
  """The JSON-able `value` of each process in `sources` (default: all), as a list in that
  order, on every process. Every process must call it, at the same point of its program;
  a process not in `sources` may pass None. Host-only: it never waits on a device."""
  if jax.process_count() == 1:
    return [value]
  client = jax_distributed.global_state.client
  sources = range(jax.process_count()) if sources is None else sources
  prefix = f'fdg_jax/exchange/{next(_exchange_count)}'
  if jax.process_index() in sources:
    client.key_value_set(f'{prefix}/{jax.process_index()}', json.dumps(value))
  values = []
  for process in sources:
    try:
      text = client.blocking_key_value_get(f'{prefix}/{process}', EXCHANGE_TIMEOUT_S * 1000)
    except Exception as e:  # pylint: disable=broad-except  (jaxlib raises its own error types)
      raise DistributedError(
          f'process {jax.process_index()} waited {EXCHANGE_TIMEOUT_S} s for process {process} '
          f'to reach the same point of the run ({" ".join(str(e).split())[:200]}); see that '
          "process's log.") from e
    values.append(json.loads(text))
  return values


def broadcast_values(values: Optional[dict[str, float]], keys: Sequence[str],
                     source: int) -> dict[str, float]:
  """`values` of process `source` (a dict with `keys`), on every process. All must call it."""
  if jax.process_count() == 1:
    return values
  mine = [float(values[k]) for k in keys] if jax.process_index() == source else None
  shared = exchange_json(mine, sources=[source])[0]
  return dict(zip(keys, shared))


def all_processes_json(value) -> list:
  """Each process's JSON-able `value`, as a list indexed by process, on every process (a few
  host values, e.g. timeline events; all must call it)."""
  return exchange_json(value)


def all_processes(values: Sequence[int]) -> np.ndarray:
  """Each process's `values` (same length everywhere), as rows indexed by process."""
  return np.asarray(exchange_json([int(v) for v in values]), np.int64).reshape(
      jax.process_count(), len(values))


# ---------------------------------------------------------------- placement and transfers

DATA_AXIS = 'data'


def stage_shardings(placement) -> tuple[jax.sharding.Sharding, jax.sharding.Sharding]:
  """(batch, state) shardings of a stage placed on `placement`.

  `placement` is a `jax.Device`, a sequence of devices (a one-axis mesh named DATA_AXIS), or a
  sharding: a `SingleDeviceSharding`, or a `NamedSharding` whose spec splits the leading (batch)
  axis over mesh axes, like `PartitionSpec('data')`. Arrays with a batch axis (stage inputs,
  outputs, cotangents, targets) take the batch sharding; the stage's parameters, optimizer state
  and statistics are replicated on all its devices. A jitted function of a split batch then
  computes what it computes on one device (BatchNorm normalises over the whole batch, the
  gradients are summed over it): the stage is data parallel.
  """
  if isinstance(placement, jax.Device):
    placement = jax.sharding.SingleDeviceSharding(placement)
  elif not isinstance(placement, jax.sharding.Sharding):
    devices = list(placement)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
      raise ValueError(f'A stage placement must be a device, a list of devices or a sharding; '
                       f'got {placement!r}.')
    if len(devices) == 1:
      placement = jax.sharding.SingleDeviceSharding(devices[0])
    else:
      mesh = jax.sharding.Mesh(np.array(devices), (DATA_AXIS,))
      placement = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
  if isinstance(placement, jax.sharding.SingleDeviceSharding):
    return placement, placement
  if not isinstance(placement, jax.sharding.NamedSharding) or len(placement.spec) > 1:
    raise ValueError(
        f'A stage placement {placement} must split at most the batch axis: give a device, a list '
        'of devices, or NamedSharding(mesh, PartitionSpec(axis)) with the batch axis on mesh '
        'axis (or axes) `axis`.')
  return placement, replicated(placement)


def replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The sharding that keeps a whole copy on each device of `sharding`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return sharding


def same_layout(a: jax.sharding.Sharding, b: jax.sharding.Sharding) -> bool:
  """Whether shard i of an array on `a` is shard i on `b` (what JAX moves across processes)."""
  if a.num_devices != b.num_devices:
    return False
  if a.num_devices == 1:
    return True
  return (isinstance(a, jax.sharding.NamedSharding) and isinstance(b, jax.sharding.NamedSharding)
          and a.mesh.axis_names == b.mesh.axis_names and a.mesh.axis_sizes == b.mesh.axis_sizes
          and a.spec == b.spec)


def move(value: Optional[jax.Array], source: jax.sharding.Sharding,
         target: jax.sharding.Sharding, spec: Optional[jax.ShapeDtypeStruct]
         ) -> Optional[jax.Array]:
  """An array from `source`'s devices to `target`'s: returns it on `target`, or None where this
  process owns no device of `target`. Every process calls it at the same point of the schedule;
  `value` is None where this process owns no device of `source`, and `spec` (the array's shape
  and dtype) is needed there.

  Within one process, or between shardings of the same devices, this is a `jax.device_put` by
  the processes that own them. Across processes it is JAX's cross-process transfer, which every
  process makes (JAX numbers the transfers by counting them in every process): the owners of
  `source` with the array, the others with a stand-in of its shape and dtype that holds no data.
  JAX moves arrays across processes only between equal layouts (shard i to shard i); between
  different ones, each shard of `target` is sent from one source device.
  """
  target_local = bool(target.addressable_devices)
  source_processes = processes_of(source)
  if source.device_set == target.device_set or (
      len(source_processes) == 1 and source_processes == processes_of(target)):
    return jax.device_put(value, target) if target_local else None   # no process boundary
  if value is None:
    value = jax.make_array_from_single_device_arrays(spec.shape, source, [], dtype=spec.dtype)
  if same_layout(source, target):
    moved = jax.device_put(value, target)
    return moved if target_local else None
  # The owners of `source` replicate the array on its devices; the first of them sends.
  shape, dtype = value.shape, value.dtype
  first = next(iter(source.devices_indices_map(shape)))
  copies = jax.device_put(value, replicated(source)) if source.addressable_devices else None
  whole = (next(shard.data for shard in copies.addressable_shards if shard.device == first)
           if first.process_index == jax.process_index() else None)
  pieces = []
  for device, index in target.devices_indices_map(shape).items():
    piece_shape = tuple(len(range(*i.indices(n))) for i, n in zip(index, shape))
    piece = move(None if whole is None else whole[index], jax.sharding.SingleDeviceSharding(first),
                 jax.sharding.SingleDeviceSharding(device), jax.ShapeDtypeStruct(piece_shape, dtype))
    if piece is not None:
      pieces.append(piece)
  return (jax.make_array_from_single_device_arrays(shape, target, pieces) if target_local
          else None)


def move_tree(value, source: jax.sharding.Sharding, target: jax.sharding.Sharding, spec=None):
  """`move` of every array of a pytree (what travels between stages may be one): `spec` is the
  tree of the arrays' `jax.ShapeDtypeStruct`s, needed where `value` is None."""
  if value is None and spec is None:
    raise ValueError('move_tree needs the value or its spec.')
  leaves, structure = jax.tree_util.tree_flatten(spec if value is None else value)
  moved = [move(None if value is None else leaf, source, target, leaf if value is None else None)
           for leaf in leaves]
  return jax.tree_util.tree_unflatten(structure, moved) if target.addressable_devices else None
