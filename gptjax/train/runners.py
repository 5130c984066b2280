"""Where the train step runs: one device (jit), the local devices (pmap), or a device
mesh (sharded jit, one or many processes), behind one interface chosen by `make_runner`.

Every runner compiles the same step (gptjax.train.step) with the old state's buffers
donated, places the state and each batch for its devices, and gives back one copy of
the state for saving and evaluation, so a checkpoint does not depend on how many
devices wrote it.

    runner = make_runner(lambda axis: make_train_step(loss_fn, opt, schedule,
                                                      axis_name=axis), loop)
    state = runner.put_state(init_state(params, opt, seed))
    state, metrics = runner.step(state, runner.put_batch(batch_fn(step)))
    runner.metrics_value(metrics)       # {"loss": 4.1, ...} as Python floats
    runner.get_state(state)             # one copy, for saving and evaluation
    runner.host_state(state)            # NumPy, whole, on every process
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gptjax.train import parallel as par

# The named axis pmap maps the step over (the step's lax.pmean runs over it).
BATCH_AXIS = "batch"
# axis name (None outside pmap) -> the pure step (state, batch) -> (state, metrics)
StepFactory = Callable[[str | None], Callable]

_HEAP_TUNED: list[bool] = []


def keep_freed_memory() -> None:
    """On CPU with glibc, keep the memory a step frees for the next step (once per process).

    XLA's CPU runtime allocates each step's temporaries (tens of MB for a small model)
    and frees them when the step ends; glibc serves blocks that large with mmap and
    hands them back to the OS, so every step page-faults them in again. Raising malloc's
    mmap and trim thresholds to 1 GiB keeps them in the heap (the gain is in the
    benchmark, `python -m gptjax.cli.bench`). A no-op elsewhere (GPU memory is XLA's own).
    """
    if _HEAP_TUNED or jax.default_backend() != "cpu":
        return
    _HEAP_TUNED.append(True)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # not glibc: leave the allocator alone
        pass


class Runner:
    """The interface the loop uses. `step` is the compiled step; `devices` the devices
    it runs on. Subclasses place the state and batches; the defaults suit a state that
    is already one copy (jit on one device, or a mesh's global arrays)."""

    devices: list
    step: Callable

    def restore_target(self, state):
        """What to restore a checkpoint into (arrays, or shapes carrying shardings)."""
        return state

    def put_state(self, state):
        """The state placed on the devices: a copy, since the step donates its input."""
        raise NotImplementedError

    def get_state(self, state):
        """One copy of a placed state (device-count independent, for saving and eval)."""
        return state

    def host_state(self, state):
        """The state as NumPy arrays, whole, on every process."""
        return jax.tree_util.tree_map(np.asarray, jax.device_get(self.get_state(state)))

    def put_batch(self, batch: dict):
        """A host batch {name: (B, ...)} placed as the step takes it."""
        raise NotImplementedError

    def metrics_value(self, metrics) -> dict:
        """A step's metrics on the host: scalars as Python floats."""
        host = self._fetch(metrics)
        return {k: (float(v) if np.ndim(v) == 0 else v) for k, v in host.items()}

    def _fetch(self, metrics):
        return jax.device_get(metrics)


def _check_batch(loop, n_devices: int) -> None:
    if loop.batch_size % (n_devices * loop.grad_accum):
        raise ValueError(
            f"batch_size={loop.batch_size} must divide by devices x grad_accum = "
            f"{n_devices} x {loop.grad_accum}"
        )


class JitRunner(Runner):
    """One device: `jax.jit`, batches shaped (accum, B / accum, ...)."""

    def __init__(self, step_factory: StepFactory, loop, device):
        _check_batch(loop, 1)
        self.devices = [device]
        self.accum = loop.grad_accum
        self.step = jax.jit(step_factory(None), donate_argnums=(0,))

    def put_state(self, state):
        # A copy: the step donates its input, and the caller keeps its arrays.
        return jax.tree_util.tree_map(jnp.copy, jax.device_put(state, self.devices[0]))

    def put_batch(self, batch: dict):
        return jax.device_put(
            {k: np.asarray(v).reshape((self.accum, -1) + np.shape(v)[1:])
             for k, v in batch.items()},
            self.devices[0])


class PmapRunner(Runner):
    """n local devices: `jax.pmap` over BATCH_AXIS, the state replicated on each, batches
    shaped (n, accum, B / (n * accum), ...)."""

    def __init__(self, step_factory: StepFactory, loop, devices: list):
        _check_batch(loop, len(devices))
        self.devices = list(devices)
        self.accum = loop.grad_accum
        self.mesh = Mesh(np.array(self.devices), (BATCH_AXIS,))
        self.sharded = NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))
        self.step = jax.pmap(step_factory(BATCH_AXIS), axis_name=BATCH_AXIS,
                             devices=self.devices, donate_argnums=(0,))

    def put_state(self, state):
        # Replicate with a sharding (jax.device_put_replicated is gone in JAX 0.10): one
        # copy on every device, stacked on a leading device axis as pmap takes it.
        n = len(self.devices)
        broadcast = jax.jit(
            lambda tree: jax.tree_util.tree_map(
                lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree),
            out_shardings=self.sharded,
        )
        return broadcast(jax.device_put(state, NamedSharding(self.mesh, PartitionSpec())))

    def get_state(self, state):
        return jax.tree_util.tree_map(lambda x: x[0], state)

    def put_batch(self, batch: dict):
        lead = (len(self.devices), self.accum, -1)
        return jax.device_put(
            {k: np.asarray(v).reshape(lead + np.shape(v)[1:]) for k, v in batch.items()},
            self.sharded)

    def _fetch(self, metrics):
        return jax.tree_util.tree_map(lambda x: x[0], jax.device_get(metrics))


class MeshRunner(Runner):
    """A sharded `jax.jit` over a (data, fsdp, tensor) mesh of one or many processes; the
    sharding rules are gptjax.train.parallel's.

    The state stays sharded: `get_state` returns global arrays (orbax saves them shard
    by shard, eval functions take them as they are) and `host_state` gathers a NumPy
    copy on every process. The step is compiled for the state's shardings, which are
    known once a state is placed (`put_state`) or restored (`restore_target`).
    """

    def __init__(self, step_factory: StepFactory, loop):
        available = jax.devices()
        n = loop.devices or len(available)
        if n > len(available):
            raise ValueError(f"devices={n} but only {len(available)} devices exist")
        if jax.process_count() > 1 and n != len(available):
            raise ValueError("a mesh over several processes uses every device; leave "
                             "devices=0")
        self.mesh = par.make_mesh(loop.mesh, available[:n])
        self.devices = list(self.mesh.devices.flat)
        self.batch_size, self.accum = loop.batch_size, loop.grad_accum
        sizes = par.mesh_sizes(self.mesh)
        self.shard = par.batch_shard(self.mesh)  # the rows this process loads
        rows, count = sizes["data"] * sizes["fsdp"], self.shard[1]
        if loop.batch_size % (rows * loop.grad_accum) or \
                loop.batch_size % (count * loop.grad_accum):
            raise ValueError(
                f"batch_size={loop.batch_size} must divide by data x fsdp x grad_accum = "
                f"{sizes['data']} x {sizes['fsdp']} x {loop.grad_accum}"
                + (f" and by processes x grad_accum = {count} x {loop.grad_accum}"
                   if count > 1 else "")
            )
        self.step_factory = step_factory
        self.shardings = None
        self.step = None  # compiled by _shardings_of, once the state's structure is known

    def _shardings_of(self, state):
        if self.shardings is None:
            self.shardings = par.state_shardings(state, self.mesh)
            self.step = jax.jit(
                self.step_factory(None),
                in_shardings=(self.shardings, par.batch_sharding(self.mesh)),
                out_shardings=(self.shardings, NamedSharding(self.mesh, PartitionSpec())),
                donate_argnums=(0,),
            )
        return self.shardings

    def restore_target(self, state):
        # Shapes with the shardings: each process reads only its shards.
        return par.abstract_tree(state, self._shardings_of(state))

    def put_state(self, state):
        return par.put_tree(state, self._shardings_of(state))

    def host_state(self, state):
        return par.to_host(state)

    def put_batch(self, batch: dict):
        # Each process may pass only its rows (see gptjax.train.parallel.batch_shard).
        return {k: par.put_local_batch(v, self.mesh, batch_size=self.batch_size,
                                       accum=self.accum, shard=self.shard)
                for k, v in batch.items()}

    def _fetch(self, metrics):
        return par.to_host(metrics)


def make_runner(step_factory: StepFactory, loop) -> Runner:
    """The runner `loop.parallel` asks for ("auto": a mesh when loop.mesh is set or
    several processes run, else pmap over loop.devices local devices when that is more
    than one, else jit); raises ValueError for a setting these devices cannot run."""
    keep_freed_memory()
    multiprocess = jax.process_count() > 1
    if par.wants_distributed(loop) and not par.is_distributed():
        raise RuntimeError(
            "distributed training is configured but jax.distributed is not running: call "
            "gptjax.train.parallel.initialize(loop) first, before any JAX computation"
        )
    mode = loop.parallel
    if mode == "auto" and (loop.mesh or multiprocess):
        mode = "mesh"
    if multiprocess and mode != "mesh":
        raise ValueError(f"parallel={mode!r} runs on one process; with "
                         f"{jax.process_count()} processes use a mesh")
    if mode == "mesh":
        return MeshRunner(step_factory, loop)
    available = jax.local_devices()
    n = loop.devices or len(available)
    if n > len(available):
        raise ValueError(f"devices={n} but only {len(available)} local devices exist")
    if mode == "auto":
        mode = "pmap" if n > 1 else "jit"
    if mode == "jit":
        if n > 1:
            raise ValueError("parallel='jit' runs on one device; use devices=1, 'pmap' or "
                             "'mesh'")
        return JitRunner(step_factory, loop, available[0])
    return PmapRunner(step_factory, loop, available[:n])
