"""Device meshes, the parameter sharding rules, and multi-host start-up.

A mesh has three named axes, outermost first:

    data    replicas of the model; the batch is split over them
    fsdp    the batch is split over them too, and every parameter and optimizer-state
            leaf is sharded along one dimension (ZeRO-3 / fully sharded data parallel)
    tensor  Megatron-style tensor parallelism inside each block

`--mesh data=2,fsdp=2,tensor=2` asks for 8 devices; an axis left out has size 1 and one
axis may be `-1` (all the devices the others leave). The axis order puts `tensor` on
the devices that are closest together (the same host, NVLink) and `data` across hosts.

The rules, all in `partition_spec`:

- tensor: attn.c_attn and mlp.c_fc (weights and biases) are split on their output axis
  (3 x width, MLP width), attn.c_proj and mlp.c_proj weights on their input axis, so
  each block needs one all-reduce after attention and one after the MLP. Everything
  else is replicated over `tensor`.
- fsdp: each leaf of the parameters and of the optimizer state (Adam's moments share
  the parameters' paths, so the same rule places them) is sharded along its largest
  dimension that divides by the fsdp size and is not already split by `tensor`. The
  leading layer axis L of the stacked blocks is used only when no other dimension
  divides; a leaf with no divisible dimension is replicated.
- data: nothing is sharded over it but the batch.

The batch (micro-batches, rows, ...) is split on its rows over (data, fsdp).

Multi-host: `initialize(loop)` starts `jax.distributed` from the loop settings or
from what JAX detects (SLURM, Open MPI, TPU pods, JAX_COORDINATOR_ADDRESS); it must
run before any JAX computation. Each process then loads only the rows of the global
batch that its devices hold (`batch_shard`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Leaves split by `tensor`, by (parent name, leaf name): the axis counted from the end.
# c_attn / c_fc produce heads / MLP units (output axis); the c_proj weights consume them
# (input axis). The c_proj biases are added after the reduction and stay whole.
TENSOR_RULES = {
    ("c_attn", "w"): -1,
    ("c_attn", "b"): -1,
    ("c_fc", "w"): -1,
    ("c_fc", "b"): -1,
    ("c_proj", "w"): -2,
}
# The dict holding the per-layer parameters, stacked with a leading L axis.
STACKED = "h"


# ----------------------------------------------------------------------------- meshes


def parse_mesh(spec: str, n_devices: int | None) -> dict[str, int]:
    """"data=2,fsdp=2,tensor=2" -> sizes of every axis (missing ones 1; one may be -1).

    With n_devices None only the syntax is checked (a -1 stays -1).
    """
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in AXES:
            raise ValueError(f"mesh {spec!r}: expected AXIS=SIZE with AXIS one of {AXES}, "
                             f"got {part!r}")
        if name in sizes:
            raise ValueError(f"mesh {spec!r}: axis {name!r} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh {spec!r}: size of {name!r} is not an integer") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"mesh {spec!r}: size of {name!r} must be >= 1 or -1")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {spec!r}: only one axis may be -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if n_devices is None:
        return {axis: sizes.get(axis, 1) for axis in AXES}
    if free:
        if n_devices % known:
            raise ValueError(f"mesh {spec!r}: {n_devices} devices do not divide by {known}")
        sizes[free[0]] = n_devices // known
    sizes = {axis: sizes.get(axis, 1) for axis in AXES}
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(
            f"mesh {spec!r} needs {math.prod(sizes.values())} devices, but {n_devices} are "
            "used (set every axis so that the sizes multiply to the device count, or make "
            "one of them -1)"
        )
    return sizes


def make_mesh(spec: str, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    jax.make_mesh orders the devices for the hardware (ICI / NVLink neighbours on the
    inner axes); the axes are Auto, so jit propagates shardings from the rules.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec or f"data={len(devices)}", len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                         axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return {axis: int(mesh.shape[axis]) for axis in AXES}


def describe(mesh: Mesh) -> str:
    return ",".join(f"{axis}={mesh.shape[axis]}" for axis in AXES)


# ----------------------------------------------------------------------------- the rules


def path_names(path) -> tuple[str, ...]:
    """A pytree key path as names: dict keys, attribute names and sequence indices
    (("opt_state", "1", "0", "mu", "wte")); orbax names saved leaves the same way."""
    out = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                out.append(str(getattr(entry, attr)))
                break
    return tuple(out)


def partition_spec(path, shape: Sequence[int], sizes: dict[str, int]) -> PartitionSpec:
    """Where one parameter or optimizer-state leaf lives on a mesh of `sizes`.

    `path` is the leaf's key path (from jax.tree_util.tree_flatten_with_path) or a tuple
    of names; only its last two names and whether it lies under the stacked blocks matter.
    """
    names = path if all(isinstance(n, str) for n in path) else path_names(path)
    ndim = len(shape)
    spec: list = [None] * ndim
    if ndim == 0:
        return PartitionSpec()
    stacked = STACKED in names[:-1] and ndim >= 2
    axis = TENSOR_RULES.get(tuple(names[-2:])) if len(names) >= 2 else None
    if sizes.get("tensor", 1) > 1 and axis is not None and ndim >= -axis:
        axis %= ndim
        if shape[axis] % sizes["tensor"]:
            raise ValueError(
                f"{'.'.join(names)} has shape {tuple(shape)}: dimension {axis} "
                f"({shape[axis]}) does not divide by tensor={sizes['tensor']}"
            )
        spec[axis] = "tensor"
    fsdp = sizes.get("fsdp", 1)
    if fsdp > 1:
        first = 1 if stacked else 0
        free = [i for i in range(first, ndim) if spec[i] is None and shape[i] % fsdp == 0]
        if not free and stacked and spec[0] is None and shape[0] % fsdp == 0:
            free = [0]
        if free:
            best = max(free, key=lambda i: (shape[i], -i))  # largest; the first on ties
            spec[best] = "fsdp"
    return PartitionSpec(*spec)


def tree_specs(tree, sizes: dict[str, int]):
    """partition_spec for every leaf of a parameter or optimizer-state tree."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: partition_spec(path, np.shape(x), sizes), tree)


def state_shardings(state: dict, mesh: Mesh) -> dict:
    """NamedShardings of a train state: the rules for params and opt_state, the rest
    (step, rng key, counters) replicated."""
    sizes = mesh_sizes(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    out = {}
    for key, value in state.items():
        if key in ("params", "opt_state"):
            out[key] = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec),
                                              tree_specs(value, sizes),
                                              is_leaf=lambda x: isinstance(x, PartitionSpec))
        else:
            out[key] = jax.tree_util.tree_map(lambda _: replicated, value)
    return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are (micro-batches, rows, ...): rows split over data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def batch_shard(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process holds rows [index * B / count, (index + 1) * B / count)
    of every global batch of B rows, so it loads only those (data.train_batch's `shard`).

    Processes whose devices hold the same rows (tensor parallelism across hosts) get the
    same index. If the mesh gives a process rows that are not one contiguous block (a
    device order that interleaves processes), every process loads the whole batch: (0, 1).
    """
    n_blocks = math.prod(mesh.shape[a] for a in BATCH_AXES)
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    held = sorted({index[0].indices(n_blocks)[:2]
                   for index in sharding.addressable_devices_indices_map((n_blocks,)).values()})
    start, stop = held[0][0], held[-1][1]
    if any(a[1] != b[0] for a, b in zip(held, held[1:])):
        log.warning("mesh %s: process %d holds batch blocks %s, not one contiguous range; "
                    "every process loads the whole batch", describe(mesh),
                    jax.process_index(), held)
        return 0, 1
    size = stop - start
    return start // size, n_blocks // size


def process_batch_shard(loop) -> tuple[int, int] | None:
    """The `shard` a batch function of these loop settings should load on this process:
    None with one process (the whole batch), else `batch_shard` of the run's mesh."""
    if jax.process_count() == 1:
        return None
    return batch_shard(make_mesh(loop.mesh))


# ----------------------------------------------------------------------------- placing


def put_tree(tree, shardings):
    """Place a pytree with these shardings (a copy: the step donates its input).

    Arrays a process holds whole (host values, one-device arrays) become global arrays
    from the process's own copy, which must be the same on every process (the same seed
    gives the same initial parameters); global arrays are resharded.
    """
    def put(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding, may_alias=False)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding, may_alias=False)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def abstract_tree(tree, shardings):
    """ShapeDtypeStructs carrying the shardings: a restore target orbax fills in place."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def to_host(tree):
    """NumPy copies of every leaf on every process (gathering the shards of global arrays)."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(get, tree)


def put_local_batch(x: np.ndarray, mesh: Mesh, *, batch_size: int, accum: int,
                    shard: tuple[int, int] | None = None):
    """This process's rows of a batch -> the global (accum, B / accum, ...) array.

    `x` holds either this process's rows (B / count of them, see `batch_shard`, which
    `shard` caches) or the whole global batch (this process's rows are taken from it).
    With one process the micro-batches are consecutive blocks of rows, as on one device;
    with several, each process's rows are split into micro-batches the same way.
    """
    x = np.asarray(x)
    index, count = shard or batch_shard(mesh)
    rows = batch_size // count
    if x.shape[0] == batch_size and count > 1:
        x = x[index * rows:(index + 1) * rows]
    elif x.shape[0] != rows:
        raise ValueError(
            f"batch_fn gave {x.shape[0]} rows; process {jax.process_index()} needs its "
            f"{rows} rows (shard {index} of {count}) or the whole batch of {batch_size}"
        )
    local = x.reshape((accum, rows // accum) + x.shape[1:])
    global_shape = (accum, batch_size // accum) + x.shape[1:]
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local, global_shape)


# ----------------------------------------------------------------------------- multi-host


def wants_distributed(loop) -> bool:
    return bool(getattr(loop, "distributed", False) or getattr(loop, "coordinator_address", ""))


def initialize(loop) -> bool:
    """Start jax.distributed if the settings ask for it; True when it is running.

    Call it first, before any JAX computation (JAX refuses afterwards). Settings left
    unset (coordinator_address "", num_processes 0, process_id -1) are detected by JAX
    from SLURM, Open MPI, TPU pods or JAX_COORDINATOR_ADDRESS. On CPU the processes
    talk through gloo (jax_cpu_collectives_implementation, the default in JAX 0.10).
    """
    if jax.distributed.is_initialized():
        return True
    if not wants_distributed(loop):
        return False
    kwargs = {}
    if loop.coordinator_address:
        kwargs["coordinator_address"] = loop.coordinator_address
    if loop.num_processes:
        kwargs["num_processes"] = loop.num_processes
    elif os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if loop.process_id >= 0:
        kwargs["process_id"] = loop.process_id
    elif os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    try:
        jax.distributed.initialize(heartbeat_timeout_seconds=loop.heartbeat_timeout,
                                   initialization_timeout=loop.init_timeout, **kwargs)
    except RuntimeError as err:
        if "before any JAX calls" in str(err):
            raise RuntimeError(
                "distributed training was asked for after JAX had started: call "
                "gptjax.train.parallel.initialize(loop) before any JAX computation"
            ) from err
        raise
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True


def is_distributed() -> bool:
    return jax.distributed.is_initialized()


def is_primary() -> bool:
    """Process 0 writes logs, metrics and run-folder files; the others only compute."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_same_everywhere(value, what: str) -> None:
    """Raise on every process if `value` (JSON data) differs between processes, e.g. a
    tokenizer trained on each host that came out differently."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    text = json.dumps(value, sort_keys=True, default=str).encode()
    digest = np.frombuffer(hashlib.sha256(text).digest()[:8], np.uint32)
    try:
        multihost_utils.assert_equal(digest, what)
    except AssertionError:
        raise ValueError(f"{what} differs between processes (process {jax.process_index()} "
                         f"has {value!r:.300})") from None


def on_every_process(flag: bool) -> bool:
    """True when `flag` is true on every process (the flag itself with one process), so
    that all processes take the same branch, e.g. whether a checkpoint could be read."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([bool(flag)]))))


@contextlib.contextmanager
def primary_first(name: str):
    """Run the block on process 0 first, then on the others (e.g. to fill a cache)."""
    if not is_primary():
        barrier(f"{name}:primary-done")
    yield
    if is_primary():
        barrier(f"{name}:primary-done")


def reached_preemption(step: int) -> bool:
    """True on every process at the same step once any of them got SIGTERM.

    JAX's preemption service (started with jax.distributed) catches SIGTERM and agrees
    on a step with the other processes; it must be asked at every step.
    """
    if not is_distributed():
        return False
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)


class PreemptionSignals:
    """The loop's signal flag under jax.distributed.

    SIGTERM is left to JAX's preemption service (a Python handler would replace its own);
    SIGINT (Ctrl-C) is turned into a SIGTERM of this process so that every process stops
    at the same step with a checkpoint. A second SIGINT stops at once.
    """

    def __init__(self):
        self.received: int | None = None  # set by the loop when the job agreed to stop
        self._old = None
        self._relayed = False

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self._relayed:
            raise KeyboardInterrupt
        self._relayed = True
        log.warning("SIGINT: asking every process to stop at the same step")
        os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
