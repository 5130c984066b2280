"""The train state, the one pure train step, and the loop both CLIs share.

The step is written once, `(state, batch) -> (state, metrics)`, with an
optional named batch axis: `jax.pmap` runs it data-parallel over the local
devices (gradients and metrics averaged with `lax.pmean`), `jax.jit` runs it on
one device; both donate the old state's buffers.

The loop fixes the data and the randomness by the step: the batch of step s is
`batch_fn(s)` and the dropout key is `fold_in(rng, s)`, so a checkpoint needs no
iterator state and a resumed run is bit-identical to an uninterrupted one.

Exit statuses of the CLIs (see `exit_code`): 0 done, 2 bad input, 3 stopped
after `max_nonfinite` consecutive non-finite steps, 130 after SIGINT and 143
after SIGTERM (a checkpoint of the step reached is saved first).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from gptjax.train import parallel as par
from gptjax.train.checkpoint import CHECKPOINT_DIR, Checkpointer, check_meta
from gptjax.train.optim import OptimConfig, make_optimizer, make_schedule

log = logging.getLogger(__name__)

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 2, 3
BATCH_AXIS = "batch"

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


@dataclass(frozen=True)
class LoopConfig:
    """How long to train and how to log, evaluate, checkpoint and parallelise."""

    # Optimizer steps to train for.
    steps: int = 2000
    # Global batch: sequences per optimizer step, over all devices and micro-batches.
    batch_size: int = 12
    # Micro-batches per step (gradient accumulation); the batch must divide by it.
    grad_accum: int = 1
    # Seed of the data order, the dropout keys and the initialisation.
    seed: int = 0
    # Evaluate every N steps (0: only at the end).
    eval_every: int = 250
    # Save a checkpoint every N steps (0: at evaluations and at the end).
    ckpt_every: int = 0
    # Keep the last N checkpoints (and the best by validation loss).
    keep: int = 3
    # Metrics fetched and logged every N steps.
    log_every: int = 10
    # Stop after this many consecutive steps with a non-finite loss or gradient.
    max_nonfinite: int = 5
    # "auto": a sharded jit over --mesh when one is given or several processes run, else
    # pmap when more than one device is used and jit on one; or force "jit", "pmap", "mesh".
    parallel: str = "auto"
    # Devices to use (0: all local devices; a mesh on several processes uses all of them).
    devices: int = 0
    # Device mesh of the sharded jit, e.g. "data=2,fsdp=2,tensor=2" or "fsdp=-1" (axes
    # data, fsdp, tensor; missing ones 1; "" = data over every device when a mesh is used).
    mesh: str = ""
    # Multi-host: start jax.distributed with the three settings below, or what JAX detects
    # (SLURM, Open MPI, TPU pods, JAX_COORDINATOR_ADDRESS) for those left unset.
    distributed: bool = False
    # host:port of process 0's coordinator, the same on every process (implies distributed).
    coordinator_address: str = ""
    # Number of processes of a multi-host run (0: detected).
    num_processes: int = 0
    # This process's index in [0, num_processes) (-1: detected).
    process_id: int = -1
    # Seconds without a heartbeat after which a process counts as dead and the job ends.
    heartbeat_timeout: int = 100
    # Seconds jax.distributed waits for every process to join.
    init_timeout: int = 300
    # Batches prepared ahead on a background thread.
    prefetch: int = 2
    # Save checkpoints asynchronously.
    async_checkpoint: bool = True
    # Optional TensorBoard event files in the run folder (needs tensorboardX).
    tensorboard: bool = False
    # Optional Weights & Biases project name (needs wandb).
    wandb_project: str = ""
    # JAX's persistent compilation cache: compiled steps are saved here and reloaded by
    # later runs with the same model, shapes, flags and versions ("" = off; a folder set
    # by JAX_COMPILATION_CACHE_DIR wins). train.py and finetune.py apply it at start-up.
    compile_cache: str = "~/.cache/gptjax/jax"

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "keep", "log_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_every", "ckpt_every", "devices", "prefetch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.parallel not in ("auto", "pmap", "jit", "mesh"):
            raise ValueError(
                f"parallel={self.parallel!r} must be 'auto', 'pmap', 'jit' or 'mesh'")
        if self.mesh:
            par.parse_mesh(self.mesh, None)
            if self.parallel in ("pmap", "jit"):
                raise ValueError(f"mesh={self.mesh!r} needs parallel='mesh' or 'auto'")
        for name in ("heartbeat_timeout", "init_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_processes < 0 or self.process_id < -1:
            raise ValueError("num_processes must be >= 0 and process_id >= -1")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}"
            )


def use_compile_cache(folder: str) -> str | None:
    """Turn on JAX's persistent compilation cache in `folder` (~ expanded); returns the
    folder in use, or None. A folder JAX has already (JAX_COMPILATION_CACHE_DIR,
    jax.config) is kept; "" changes nothing. JAX decides once per process, at its first
    compilation, whether to use the cache, so call this before anything is jitted."""
    current = jax.config.jax_compilation_cache_dir
    if current or not folder:
        return current
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.warning("compile_cache=%r cannot be created (%s); compiling without it",
                    folder, err)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return str(path)


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


@dataclass
class TrainResult:
    state: dict  # the final train state, un-replicated
    status: str  # "done", "preempted" (by a signal) or "stopped" (stop_after)
    signal: int | None = None
    history: list = dataclasses.field(default_factory=list)
    evals: list = dataclasses.field(default_factory=list)


def exit_code(result: TrainResult) -> int:
    return EXIT_OK if result.signal is None else 128 + int(result.signal)


# ----------------------------------------------------------------------------- state and step


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> dict:
    """The whole train state as one pytree (a dict, so checkpoints read back plainly)."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": optimizer.init(params),
        "rng": jax.random.PRNGKey(seed),
        "nonfinite": jnp.zeros((), jnp.int32),  # consecutive non-finite steps
        "skipped": jnp.zeros((), jnp.int32),  # total skipped steps
    }


_HEAP_TUNED: list[bool] = []


def keep_freed_memory() -> None:
    """On CPU with glibc, keep the memory a step frees for the next step (once per process).

    XLA's CPU runtime allocates each step's temporaries (about 50 MB for the char model)
    and frees them when the step ends; glibc serves blocks that large with mmap and hands
    them back to the OS, so every step page-faults them in again. Raising malloc's mmap
    and trim thresholds to 1 GiB keeps them in the heap: measured 20-25% less CPU time
    per char-recipe step on 2 cores. A no-op elsewhere (GPU memory is XLA's own).
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


def make_train_step(loss_fn: LossFn, optimizer, schedule, *, axis_name: str | None = None):
    """The pure step `(state, batch) -> (state, metrics)`.

    `batch` leaves have a leading micro-batch axis (grad_accum, b, ...); the
    gradient is the mean over micro-batches, which equals the full-batch gradient
    of a mean loss. Under pmap (axis_name set) gradients and metrics are averaged
    over devices. A step whose loss or gradient norm is not finite leaves the
    parameters and optimizer state unchanged and is counted.
    """
    keep_freed_memory()

    def step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        n_micro = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if n_micro == 1:
            micro = jax.tree_util.tree_map(lambda x: x[0], batch)
            (loss, aux), grads = grad_fn(state["params"], micro, rng)
        else:
            def accumulate(carry, xs):
                i, micro = xs
                (loss, aux), grads = grad_fn(state["params"], micro, jax.random.fold_in(rng, i))
                return jax.tree_util.tree_map(jnp.add, carry, (loss, aux, grads)), None

            first = jax.eval_shape(grad_fn, state["params"],
                                   jax.tree_util.tree_map(lambda x: x[0], batch), rng)
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                           (first[0][0], first[0][1], first[1]))
            (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros,
                                                 (jnp.arange(n_micro), batch))
            loss, aux, grads = jax.tree_util.tree_map(lambda x: x / n_micro, (loss, aux, grads))
        if axis_name is not None:
            loss, aux, grads = jax.lax.pmean((loss, aux, grads), axis_name)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)

        def keep_if_finite(new, old):
            return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = {
            "step": state["step"] + 1,
            "params": keep_if_finite(new_params, state["params"]),
            "opt_state": keep_if_finite(new_opt, state["opt_state"]),
            "rng": state["rng"],
            "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1),
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "finite": finite, "nonfinite": new_state["nonfinite"],
                   "skipped": new_state["skipped"], **aux}
        return new_state, metrics

    return step


class Parallel:
    """Runs the step on one device with jit, on n local devices with pmap, or as one
    sharded jit over a device mesh (data / FSDP / tensor parallelism, one or many
    processes; the sharding rules are in gptjax.train.parallel).

    Under a mesh the state stays sharded: `get_state` returns global arrays (orbax saves
    them shard by shard, eval functions take them as they are) and `host_state` gathers
    a NumPy copy on every process.
    """

    def __init__(self, step_fn_factory, loop: LoopConfig):
        multiprocess = jax.process_count() > 1
        mode = loop.parallel
        if par.wants_distributed(loop) and not par.is_distributed():
            raise RuntimeError(
                "distributed training is configured but jax.distributed is not running: call "
                "gptjax.parallel.initialize(loop) first, before any JAX computation"
            )
        if mode == "auto" and (loop.mesh or multiprocess):
            mode = "mesh"
        if multiprocess and mode != "mesh":
            raise ValueError(f"parallel={mode!r} runs on one process; with "
                             f"{jax.process_count()} processes use a mesh")
        self.accum = loop.grad_accum
        self.batch_size = loop.batch_size
        self.step_fn_factory = step_fn_factory
        self.step = None
        if mode == "mesh":
            available = jax.devices()
            n = loop.devices or len(available)
            if n > len(available):
                raise ValueError(f"devices={n} but only {len(available)} devices exist")
            if multiprocess and n != len(available):
                raise ValueError("a mesh over several processes uses every device; leave "
                                 "devices=0")
            self.mesh = par.make_mesh(loop.mesh, available[:n])
            self.devices = list(self.mesh.devices.flat)
            self.n = n
            self.mode = mode
            sizes = par.mesh_sizes(self.mesh)
            rows = sizes["data"] * sizes["fsdp"]
            self.shard = par.batch_shard(self.mesh)  # the rows this process loads
            count = self.shard[1]
            if loop.batch_size % (rows * loop.grad_accum) or \
                    loop.batch_size % (count * loop.grad_accum):
                raise ValueError(
                    f"batch_size={loop.batch_size} must divide by data x fsdp x grad_accum = "
                    f"{sizes['data']} x {sizes['fsdp']} x {loop.grad_accum}"
                    + (f" and by processes x grad_accum = {count} x {loop.grad_accum}"
                       if count > 1 else "")
                )
            self.replicated = NamedSharding(self.mesh, PartitionSpec())
            self.shardings = None
            return
        available = jax.local_devices()
        n = loop.devices or len(available)
        if n > len(available):
            raise ValueError(f"devices={n} but only {len(available)} local devices exist")
        self.devices = available[:n]
        self.n = n
        if mode == "auto":
            mode = "pmap" if n > 1 else "jit"
        if mode == "jit" and n > 1:
            raise ValueError("parallel='jit' runs on one device; use devices=1, 'pmap' or "
                             "'mesh'")
        self.mode = mode
        if loop.batch_size % (n * loop.grad_accum):
            raise ValueError(
                f"batch_size={loop.batch_size} must divide by devices x grad_accum = "
                f"{n} x {loop.grad_accum}"
            )
        if mode == "pmap":
            self.mesh = jax.sharding.Mesh(np.array(self.devices), (BATCH_AXIS,))
            self.sharded = NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))
            self.step = jax.pmap(step_fn_factory(BATCH_AXIS), axis_name=BATCH_AXIS,
                                 devices=self.devices, donate_argnums=(0,))
        else:
            self.step = jax.jit(step_fn_factory(None), donate_argnums=(0,))

    def _shard_step(self, state):
        """Under a mesh: the shardings of this state and the jitted step that keeps them."""
        if self.shardings is None:
            self.shardings = par.state_shardings(state, self.mesh)
            self.step = jax.jit(
                self.step_fn_factory(None),
                in_shardings=(self.shardings, par.batch_sharding(self.mesh)),
                out_shardings=(self.shardings, self.replicated),
                donate_argnums=(0,),
            )
        return self.shardings

    def restore_target(self, state):
        """What to restore a checkpoint into: under a mesh, shapes with the shardings
        (each process reads only its shards); otherwise the state itself."""
        if self.mode != "mesh":
            return state
        return par.abstract_tree(state, self._shard_step(state))

    def put_state(self, state):
        if self.mode == "mesh":
            return par.put_tree(state, self._shard_step(state))
        if self.mode == "jit":
            # A copy: the step donates its input, and the caller keeps its arrays.
            return jax.tree_util.tree_map(jnp.copy, jax.device_put(state, self.devices[0]))
        n = self.n
        broadcast = jax.jit(
            lambda tree: jax.tree_util.tree_map(
                lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree),
            out_shardings=self.sharded,
        )
        return broadcast(jax.device_put(state, NamedSharding(self.mesh, PartitionSpec())))

    def get_state(self, state):
        """One copy of the state (device-count independent, for saving and eval)."""
        if self.mode == "pmap":
            return jax.tree_util.tree_map(lambda x: x[0], state)
        return state

    def host_state(self, state):
        """The state as NumPy arrays, whole, on every process."""
        if self.mode == "mesh":
            return par.to_host(state)
        return jax.tree_util.tree_map(np.asarray, jax.device_get(self.get_state(state)))

    def put_batch(self, batch: dict):
        """Host batch (B, ...) -> (devices, accum, B / (devices * accum), ...) on device
        (pmap), (accum, B / accum, ...) on one device (jit) or sharded over the mesh's
        data and fsdp axes (mesh; each process may pass only its rows, see
        gptjax.parallel.batch_shard)."""
        if self.mode == "mesh":
            return {k: par.put_local_batch(v, self.mesh, batch_size=self.batch_size,
                                           accum=self.accum, shard=self.shard)
                    for k, v in batch.items()}

        def split(x):
            x = np.asarray(x)
            lead = (self.n, self.accum) if self.mode == "pmap" else (self.accum,)
            return x.reshape(lead + (-1,) + x.shape[1:])

        batch = {k: split(v) for k, v in batch.items()}
        if self.mode == "pmap":
            return jax.device_put(batch, self.sharded)
        return jax.device_put(batch, self.devices[0])

    def metrics_value(self, metrics):
        if self.mode == "mesh":
            host = par.to_host(metrics)
        else:
            host = jax.device_get(metrics)
        if self.mode == "pmap":
            host = jax.tree_util.tree_map(lambda x: x[0], host)
        return {k: (float(v) if np.ndim(v) == 0 else v) for k, v in host.items()}

    def preempted(self, step: int) -> bool:
        """Under jax.distributed: whether every process agreed to stop after `step`."""
        return par.reached_preemption(step)


# ----------------------------------------------------------------------------- run folders


def prepare_run_dir(path: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Create the run folder; never reuse an existing one without resume or overwrite."""
    path = Path(path)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if path.exists() and any(path.iterdir()):
        if resume:
            return path
        if not overwrite:
            raise FileExistsError(
                f"run folder {path} exists; pass --resume to continue it or --overwrite to "
                "replace it"
            )
        shutil.rmtree(path)
    elif resume:
        raise FileNotFoundError(f"--resume: run folder {path} does not exist")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """metrics.jsonl always; TensorBoard and W&B when asked (imported lazily)."""

    def __init__(self, run_dir: Path, loop: LoopConfig, config: dict):
        self.file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115
        self.tb = self.wandb = None
        if loop.tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as err:
                raise ImportError("tensorboard=True needs `pip install tensorboardX`") from err
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if loop.wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("wandb_project needs `pip install wandb`") from err
            self.wandb = wandb.init(project=loop.wandb_project, config=config,
                                    dir=str(run_dir))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png from metrics.jsonl: training loss and validation loss against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train.append((rec["step"], rec["loss"]))
        if "val_loss" in rec:
            val.append((rec["step"], rec["val_loss"]))
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    out = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- FLOPs


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6 N + 6 L T D.

    N counts the matmul parameters (the blocks' weight matrices and the tied
    output projection V x D; not the position table or biases): each is used
    in one multiply-add forward and two backward, 6 FLOPs per token. Causal
    attention's score and value matmuls add 2 * 2 * T * D per layer forward
    for a full T x T, half of it under the causal mask, times 3 for
    forward + backward: 6 L T D. (The PaLM/nanoGPT convention counts the full
    square, 12 L T D; `flops_per_token(cfg) + 6 L T D` gives that.)
    """
    D, F, L, V, T = cfg.n_embd, cfg.mlp_width, cfg.n_layer, cfg.vocab_size, cfg.n_ctx
    matmul_params = L * (4 * D * D + 2 * D * F) + V * D
    return 6.0 * matmul_params + 6.0 * L * T * D


_PEAK_FLOPS = {  # dense bf16 peak per device, from the vendors' data sheets
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12,
    "V100": 125e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v6": 918e12,
}


def datasheet_peak_flops(device=None) -> float | None:
    """The data sheet's dense bf16 FLOP/s for a known accelerator, else None."""
    device = device or jax.local_devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in _PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def device_peak_flops(device=None, dtype: str = "float32") -> float:
    """Peak FLOP/s of one device: the data-sheet figure, or on CPU a measured matmul rate
    in the compute dtype (bfloat16 runs about twice float32's rate on AVX512-BF16)."""
    return datasheet_peak_flops(device) or measured_matmul_flops(dtype)


_MEASURED: dict[str, float] = {}
MATMUL_PEAK_N = 1024


def measured_matmul_flops(dtype: str = "float32", rounds: int = 5, repeats: int = 4) -> float:
    """The best rate of a jitted MATMUL_PEAK_N^3 matmul in `dtype` over `rounds` rounds,
    accumulating in float32 as the model's products do (cached per dtype): the CPU's
    practical peak, shared by train.py's logged MFU and the benchmark."""
    if dtype not in _MEASURED:
        n = MATMUL_PEAK_N
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
        f(a).block_until_ready()
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(repeats):
                out = f(a)
            out.block_until_ready()
            best = min(best, (time.perf_counter() - start) / repeats)
        _MEASURED[dtype] = 2 * n**3 / best
    return _MEASURED[dtype]


# ----------------------------------------------------------------------------- the loop


class _SignalCatcher:
    """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum
        log.warning("received signal %s: saving at the next step boundary", signum)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Prefetcher:
    """Builds and transfers the batches of the coming steps on a background thread."""

    def __init__(self, make, start: int, stop: int, depth: int):
        self.make, self.depth = make, depth
        if depth == 0:
            self.thread = None
            self.next_step = start
            return
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(start, stop), daemon=True)
        self.thread.start()

    def _run(self, start, stop):
        for step in range(start, stop):
            if self.stopped.is_set():
                return
            try:
                item = (step, self.make(step), None)
            except Exception as err:  # surfaced in the main thread
                item = (step, None, err)
            while not self.stopped.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def get(self, step):
        if self.thread is None:
            return self.make(step)
        while True:
            # Short waits: a signal (Ctrl-C) caught by another thread only runs its Python
            # handler when the main thread returns to Python, not while it blocks here
            # on a slow batch.
            try:
                got, batch, err = self.queue.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        if err is not None:
            raise err
        assert got == step, (got, step)
        return batch

    def close(self):
        if self.thread is not None:
            self.stopped.set()
            self.thread.join(timeout=5)


def train(
    *,
    run_dir: str | Path,
    loop: LoopConfig,
    optim: OptimConfig,
    params,
    loss_fn: LossFn,
    batch_fn: Callable[[int], dict],
    eval_fn: Callable[[Any], dict] | None = None,
    meta: dict | None = None,
    resume: bool = False,
    check_keys: tuple[str, ...] = ("model", "tokenizer", "data"),
    tokens_per_step: int | None = None,
    flops_per_step: float | None = None,
    compute_dtype: str = "float32",
    show_progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train until loop.steps, evaluating, logging and checkpointing on the way.

    params: the initial parameters (ignored values, used for structure, on resume).
    loss_fn(params, batch, rng) -> (loss, aux metrics dict) on one micro-batch.
    batch_fn(step) -> dict of host arrays with the global batch as leading axis;
    it must be a pure function of the step. With several processes it may return
    only this process's rows (`gptjax.parallel.process_batch_shard(loop)` says which).
    eval_fn(params) -> dict of floats (a "val_loss" entry makes the checkpoint eligible
    as the best one); under a mesh it gets the sharded parameters, on every process.
    meta (JSON) is saved with every checkpoint; on resume the entries named in
    check_keys must equal the checkpoint's. stop_after=k stops after step k as a
    preemption would (checkpoint saved, status "stopped"): the schedule still spans
    loop.steps, so a resumed run continues exactly.
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    meta = dict(meta or {})
    schedule = make_schedule(optim, loop.steps)
    optimizer = make_optimizer(optim, loop.steps)
    parallel = Parallel(lambda axis: make_train_step(loss_fn, optimizer, schedule,
                                                     axis_name=axis), loop)
    state = init_state(params, optimizer, loop.seed)
    # Several processes: all compute and checkpoint (orbax coordinates them); only
    # process 0 writes metrics and shows progress. They must agree on what they train.
    par.check_same_everywhere(meta, "the run's metadata (model, tokenizer, data)")
    primary = par.is_primary()
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, keep=loop.keep,
                        async_save=loop.async_checkpoint)
    if resume:
        state, _, saved_step = ckpt.restore(
            parallel.restore_target(state),
            check=lambda saved, s: check_meta(saved, meta, check_keys, f"{run_dir} (step {s})"))
        log.info("resumed %s at step %d", run_dir, saved_step)
    start = int(state["step"])
    logger = MetricsLog(run_dir, loop, meta) if primary else None
    result = TrainResult(state=state, status="done")
    peak = (device_peak_flops(parallel.devices[0], compute_dtype) * parallel.n
            if flops_per_step else None)

    def save(step_state, metrics=None):
        ckpt.save(int(step_state["step"]), step_state, meta, metrics)

    def evaluate(step_state):
        if eval_fn is None:
            return None
        values = {k: float(v) for k, v in eval_fn(step_state["params"]).items()}
        record = {"step": int(step_state["step"]), **values}
        if logger is not None:
            logger.write(record)
        result.evals.append(record)
        return values

    state = parallel.put_state(state)
    prefetch = _Prefetcher(lambda s: parallel.put_batch(batch_fn(s)), start, loop.steps,
                           loop.prefetch)
    bar = tqdm(total=loop.steps, initial=start, disable=not (show_progress and primary),
               dynamic_ncols=True)
    pending: list[tuple[int, Any]] = []
    window_start, window_steps = time.perf_counter(), 0

    def drain(force=False):
        """Fetch metrics of finished steps (one step behind, so the host never waits)."""
        nonlocal window_start, window_steps
        keep = 0 if force else 1
        while len(pending) > keep:
            step, metrics = pending.pop(0)
            values = parallel.metrics_value(metrics)
            if values["nonfinite"] >= loop.max_nonfinite:
                raise TrainingDiverged(
                    f"{int(values['nonfinite'])} consecutive steps with a non-finite loss or "
                    f"gradient (last at step {step}); stopping. The last checkpoint in "
                    f"{ckpt.directory} is intact (steps {ckpt.steps()})"
                )
            if not values["finite"]:
                log.warning("step %d: non-finite loss or gradient; update skipped", step)
            if (step + 1) % loop.log_every == 0 or step + 1 == loop.steps:
                now = time.perf_counter()
                elapsed = max(now - window_start, 1e-9)
                record = {"step": step + 1, **{k: v for k, v in values.items()
                                               if k not in ("finite",)}}
                if tokens_per_step:
                    record["tokens_per_s"] = tokens_per_step * window_steps / elapsed
                if flops_per_step and peak:
                    record["mfu"] = flops_per_step * window_steps / elapsed / peak
                if logger is not None:
                    logger.write(record)
                result.history.append(record)
                post = {"loss": f"{values['loss']:.4f}", "lr": f"{values['lr']:.2e}"}
                if "tokens_per_s" in record:
                    post["tok/s"] = f"{record['tokens_per_s']:.0f}"
                if "mfu" in record:
                    post["mfu"] = f"{100 * record['mfu']:.1f}%"
                bar.set_postfix(post)
                window_start, window_steps = now, 0

    try:
        # Under jax.distributed its preemption service owns SIGTERM and makes every
        # process stop at the same step.
        signal_context = par.PreemptionSignals() if par.is_distributed() else _SignalCatcher()
        with signal_context as signals:
            for step in range(start, loop.steps):
                batch = prefetch.get(step)
                state, metrics = parallel.step(state, batch)
                pending.append((step, metrics))
                window_steps += 1
                bar.update(1)
                drain()
                done = step + 1
                if parallel.preempted(done):
                    signals.received = signal.SIGTERM
                is_eval = loop.eval_every and done % loop.eval_every == 0 and done < loop.steps
                is_ckpt = loop.ckpt_every and done % loop.ckpt_every == 0 and done < loop.steps
                if signals.received is not None or done == stop_after:
                    drain(force=True)
                    host_state = parallel.get_state(state)
                    save(host_state)
                    ckpt.wait()
                    if signals.received is not None:
                        result.status, result.signal = "preempted", signals.received
                        log.warning("saved step %d after signal %d", done, signals.received)
                    else:
                        result.status = "stopped"
                    break
                if is_eval or is_ckpt:
                    drain(force=True)
                    host_state = parallel.get_state(state)
                    values = evaluate(host_state) if is_eval else None
                    save(host_state, values)
            else:
                drain(force=True)
                host_state = parallel.get_state(state)
                if int(host_state["step"]) > start or not ckpt.steps():
                    values = evaluate(host_state)
                    save(host_state, values)
        ckpt.wait()
    finally:
        prefetch.close()
        bar.close()
        ckpt.close()
        if logger is not None:
            logger.close()
    result.state = parallel.host_state(state)
    return result


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """Bits per UTF-8 byte of text from a mean loss in nats per token."""
    return loss_nats * tokens / (max(n_bytes, 1) * math.log(2))
