"""The training loop both CLIs share: train() runs the step (gptjax.train.step) on the
runner the settings choose (gptjax.train.runners) until loop.steps, evaluating, logging
(gptjax.train.metrics) and checkpointing (gptjax.train.checkpoint) on the way.

The loop fixes the data and the randomness by the step: the batch of step s is
`batch_fn(s)` and the dropout key is `fold_in(rng, s)`, so a checkpoint needs no
iterator state and a resumed run is bit-identical to an uninterrupted one.

Exit statuses of the CLIs (see `exit_code`): 0 done, 2 bad input, 3 stopped
after `max_nonfinite` consecutive non-finite steps, 130 after SIGINT and 143
after SIGTERM (a checkpoint of the step reached is saved first).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from gptjax.config import GPTConfig
from gptjax.train import parallel as par
from gptjax.train.checkpoint import CHECKPOINT_DIR, Checkpointer, check_meta
from gptjax.train.flops import device_peak_flops
from gptjax.train.metrics import MetricsLog
from gptjax.train.optim import OptimConfig, make_optimizer, make_schedule
from gptjax.train.runners import Runner, make_runner
from gptjax.train.step import LossFn, init_state, make_train_step

log = logging.getLogger(__name__)

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 2, 3


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


# ----------------------------------------------------------------------------- helpers


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


class _StepLog:
    """The metrics of finished steps: fetched one step late (so the host never waits for
    the device), checked for divergence, and every log_every steps written with the
    throughput and MFU of the steps since the last record."""

    def __init__(self, loop: LoopConfig, runner: Runner, ckpt: Checkpointer,
                 logger: MetricsLog | None, history: list, bar, *,
                 tokens_per_step: int | None, flops_per_step: float | None,
                 peak_flops: float | None):
        self.loop, self.runner, self.ckpt, self.logger = loop, runner, ckpt, logger
        self.history, self.bar = history, bar
        self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
        self.peak_flops = peak_flops
        self.pending: list[tuple[int, Any]] = []
        self.window_start, self.window_steps = time.perf_counter(), 0

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, metrics))
        self.window_steps += 1
        self.bar.update(1)
        self.drain()

    def drain(self, force: bool = False) -> None:
        """Handle every pending step but the newest (all of them when forced)."""
        keep = 0 if force else 1
        while len(self.pending) > keep:
            step, metrics = self.pending.pop(0)
            values = self.runner.metrics_value(metrics)
            if values["nonfinite"] >= self.loop.max_nonfinite:
                raise TrainingDiverged(
                    f"{int(values['nonfinite'])} consecutive steps with a non-finite loss or "
                    f"gradient (last at step {step}); stopping. The last checkpoint in "
                    f"{self.ckpt.directory} is intact (steps {self.ckpt.steps()})"
                )
            if not values["finite"]:
                log.warning("step %d: non-finite loss or gradient; update skipped", step)
            if (step + 1) % self.loop.log_every == 0 or step + 1 == self.loop.steps:
                self._record(step + 1, values)

    def _record(self, done: int, values: dict) -> None:
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        record = {"step": done, **{k: v for k, v in values.items() if k != "finite"}}
        if self.tokens_per_step:
            record["tokens_per_s"] = self.tokens_per_step * self.window_steps / elapsed
        if self.flops_per_step and self.peak_flops:
            record["mfu"] = self.flops_per_step * self.window_steps / elapsed / self.peak_flops
        if self.logger is not None:
            self.logger.write(record)
        self.history.append(record)
        post = {"loss": f"{values['loss']:.4f}", "lr": f"{values['lr']:.2e}"}
        if "tokens_per_s" in record:
            post["tok/s"] = f"{record['tokens_per_s']:.0f}"
        if "mfu" in record:
            post["mfu"] = f"{100 * record['mfu']:.1f}%"
        self.bar.set_postfix(post)
        self.window_start, self.window_steps = now, 0


class _Run:
    """One call of train(): the steps from `start` to loop.steps, with the evaluations,
    checkpoints and stops (signal, preemption, stop_after) on the way."""

    def __init__(self, loop: LoopConfig, runner: Runner, ckpt: Checkpointer, meta: dict,
                 eval_fn: Callable[[Any], dict] | None, logger: MetricsLog | None,
                 result: TrainResult, steps: _StepLog):
        self.loop, self.runner, self.ckpt, self.meta = loop, runner, ckpt, meta
        self.eval_fn, self.logger, self.result, self.steps = eval_fn, logger, result, steps

    def evaluate(self, state) -> dict | None:
        if self.eval_fn is None:
            return None
        values = {k: float(v) for k, v in self.eval_fn(state["params"]).items()}
        record = {"step": int(state["step"]), **values}
        if self.logger is not None:
            self.logger.write(record)
        self.result.evals.append(record)
        return values

    def save(self, state, metrics: dict | None = None) -> None:
        self.ckpt.save(int(state["step"]), state, self.meta, metrics)

    def run(self, state, start: int, prefetch: _Prefetcher, signals,
            stop_after: int | None):
        """Train from step `start`; returns the placed state of the last step taken."""
        loop = self.loop
        for step in range(start, loop.steps):
            state, metrics = self.runner.step(state, prefetch.get(step))
            self.steps.add(step, metrics)
            done = step + 1
            if par.reached_preemption(done):  # every process agreed to stop here
                signals.received = signal.SIGTERM
            if signals.received is not None or done == stop_after:
                self.stop(state, done, signals.received)
                return state
            is_eval = loop.eval_every and done % loop.eval_every == 0 and done < loop.steps
            is_ckpt = loop.ckpt_every and done % loop.ckpt_every == 0 and done < loop.steps
            if is_eval or is_ckpt:
                self.steps.drain(force=True)
                one = self.runner.get_state(state)
                self.save(one, self.evaluate(one) if is_eval else None)
        self.steps.drain(force=True)
        one = self.runner.get_state(state)
        if int(one["step"]) > start or not self.ckpt.steps():
            self.save(one, self.evaluate(one))
        return state

    def stop(self, state, done: int, received: int | None) -> None:
        """Save the step reached and wait for the save; status "preempted" after a signal,
        "stopped" at stop_after."""
        self.steps.drain(force=True)
        self.save(self.runner.get_state(state))
        self.ckpt.wait()
        if received is not None:
            self.result.status, self.result.signal = "preempted", received
            log.warning("saved step %d after signal %d", done, received)
        else:
            self.result.status = "stopped"


def _resume(ckpt: Checkpointer, runner: Runner, state: dict, meta: dict,
            check_keys: tuple[str, ...], run_dir: Path) -> dict:
    """The newest readable checkpoint whose metadata matches (see Checkpointer.restore)."""
    state, _, saved_step = ckpt.restore(
        runner.restore_target(state),
        check=lambda saved, s: check_meta(saved, meta, check_keys, f"{run_dir} (step {s})"))
    log.info("resumed %s at step %d", run_dir, saved_step)
    return state


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
    model: GPTConfig | None = None,
) -> TrainResult:
    """Train until loop.steps, evaluating, logging and checkpointing on the way.

    params: the initial parameters (ignored values, used for structure, on resume).
    loss_fn(params, batch, rng) -> (loss, aux metrics dict) on one micro-batch.
    batch_fn(step) -> dict of host arrays with the global batch as leading axis;
    it must be a pure function of the step. With several processes it may return
    only this process's rows (`gptjax.train.parallel.process_batch_shard(loop)` says
    which). eval_fn(params) -> dict of floats (a "val_loss" entry makes the checkpoint
    eligible as the best one); under a mesh it gets the sharded parameters, on every
    process. meta (JSON) is saved with every checkpoint; on resume the entries named in
    check_keys must equal the checkpoint's. stop_after=k stops after step k as a
    preemption would (checkpoint saved, status "stopped"): the schedule still spans
    loop.steps, so a resumed run continues exactly. model: the GPTConfig trained, for
    per-parameter learning rates under muP (make_optimizer); None: one rate for all.
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    meta = dict(meta or {})
    schedule = make_schedule(optim, loop.steps)
    optimizer = make_optimizer(optim, loop.steps, model=model)
    runner = make_runner(lambda axis: make_train_step(loss_fn, optimizer, schedule,
                                                      axis_name=axis), loop)
    state = init_state(params, optimizer, loop.seed)
    # Several processes: all compute and checkpoint (orbax coordinates them); only
    # process 0 writes metrics and shows progress. They must agree on what they train.
    par.check_same_everywhere(meta, "the run's metadata (model, tokenizer, data)")
    primary = par.is_primary()
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, keep=loop.keep,
                        async_save=loop.async_checkpoint)
    if resume:
        state = _resume(ckpt, runner, state, meta, check_keys, run_dir)
    start = int(state["step"])
    logger = (MetricsLog(run_dir, tensorboard=loop.tensorboard,
                         wandb_project=loop.wandb_project, config=meta)
              if primary else None)
    result = TrainResult(state=state, status="done")
    peak = (device_peak_flops(runner.devices[0], compute_dtype) * len(runner.devices)
            if flops_per_step else None)
    state = runner.put_state(state)
    prefetch = _Prefetcher(lambda s: runner.put_batch(batch_fn(s)), start, loop.steps,
                           loop.prefetch)
    bar = tqdm(total=loop.steps, initial=start, disable=not (show_progress and primary),
               dynamic_ncols=True)
    steps = _StepLog(loop, runner, ckpt, logger, result.history, bar,
                     tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
                     peak_flops=peak)
    run = _Run(loop, runner, ckpt, meta, eval_fn, logger, result, steps)
    try:
        # Under jax.distributed its preemption service owns SIGTERM and makes every
        # process stop at the same step.
        signal_context = par.PreemptionSignals() if par.is_distributed() else _SignalCatcher()
        with signal_context as signals:
            state = run.run(state, start, prefetch, signals, stop_after)
        ckpt.wait()
    finally:
        prefetch.close()
        bar.close()
        ckpt.close()
        if logger is not None:
            logger.close()
    result.state = runner.host_state(state)
    return result
