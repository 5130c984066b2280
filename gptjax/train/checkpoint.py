"""Checkpoints of the whole train state with orbax, and loading a finished run.

A checkpoint holds the parameters, the optimizer state, the step, the RNG key
and the NaN counters (one pytree), plus JSON metadata: the model config, the
tokenizer fingerprint, the data fingerprint and the metrics of that step. It is
saved un-replicated (one copy of each array), so a run saved on 8 devices
restores on 1 and the other way round.

orbax writes each step into a temporary folder and renames it when complete,
so a killed process leaves no half checkpoint that looks finished. A step
folder that cannot be read (planted, truncated, corrupted) is skipped with a
logged warning and the previous step is used; if none can be read, the error
names every step tried. It never silently starts from scratch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not match the run."""


class Checkpointer:
    """Saves every N steps, keeps the last `keep` and the best by validation loss."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Start saving (asynchronously); arrays are copied off the device before it returns."""
        saved_metrics = None
        if metrics and "val_loss" in metrics:
            saved_metrics = {"val_loss": float(metrics["val_loss"])}
        meta = {**meta, "step": int(step), "metrics": metrics or {}}
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            metrics=saved_metrics,
            force=True,
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def restore_meta(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def restore(self, target: Any, step: int | None = None,
                check: Callable[[dict, int], None] | None = None) -> tuple[Any, dict, int]:
        """Restore into the structure of `target` (arrays or ShapeDtypeStructs).

        With no step, the newest readable one; unreadable steps are skipped with a
        warning. `check(meta, step)` runs on the metadata before the arrays are
        read, so a mismatched model is reported as such (its errors propagate).
        Returns (state, meta, step).
        """
        steps = [step] if step is not None else self.steps()[::-1]
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        failures = []
        for s in steps:
            try:
                meta = self.restore_meta(s)
            except Exception as err:  # orbax raises many types for a bad folder
                meta, error = None, err
            if meta is not None:
                if check is not None:
                    check(meta, s)
                try:
                    out = self.manager.restore(
                        s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                    )
                except Exception as err:
                    error = err
                else:
                    if failures:
                        log.warning("restored step %s after skipping unreadable step(s)", s)
                    return out["state"], meta, s
            failures.append(f"step {s}: {type(error).__name__}: {str(error)[:200]}")
            log.warning("checkpoint at step %s in %s is unreadable (%s); trying an older one",
                        s, self.directory, failures[-1])
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}; tried " + "; ".join(failures)
        )


def best_step(ckpt: Checkpointer) -> int | None:
    """The step with the lowest validation loss recorded in its metadata, if any."""
    best = None
    for step in ckpt.steps():
        try:
            loss = (ckpt.restore_meta(step).get("metrics") or {}).get("val_loss")
        except Exception:  # an unreadable step cannot be the best one
            continue
        if loss is not None and (best is None or loss < best[1]):
            best = (step, loss)
    return None if best is None else best[0]


def check_meta(saved: dict, current: dict, keys: tuple[str, ...], where: str) -> None:
    """Refuse to resume when the model, tokenizer or data differ from the checkpoint's."""
    for key in keys:
        if key in current and saved.get(key) != current.get(key):
            a, b = saved.get(key), current.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                detail = ", ".join(f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}"
                                   for k in diff)
            else:
                detail = f"checkpoint {a!r} vs now {b!r}"
            raise CheckpointError(f"cannot resume from {where}: {key} differs ({detail})")


def verify_resume(run_dir: str | Path, meta: dict, keys: tuple[str, ...]) -> None:
    """Check a run's newest readable checkpoint metadata before anything is written."""
    ckpt = Checkpointer(Path(run_dir) / CHECKPOINT_DIR, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise CheckpointError(f"--resume: no checkpoint in {ckpt.directory}")
        for step in steps[::-1]:
            try:
                saved = ckpt.restore_meta(step)
            except Exception:  # unreadable: restore() will say so and fall back
                continue
            check_meta(saved, meta, keys, f"{run_dir} (step {step})")
            return
    finally:
        ckpt.close()


def _one_device_target(ckpt: Checkpointer, step: int):
    """The saved state's shapes and dtypes, placed on this process's first device.

    Restoring without a target would reuse the sharding recorded at save time,
    which names devices this process may not have (a run saved under an 8-device
    mesh, loaded on 1).
    """
    saved = ocp.StandardCheckpointer().metadata(ckpt.directory / str(step) / "state")
    tree = getattr(saved, "item_metadata", saved)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def load_run(run_dir: str | Path, *, which: str = "latest"):
    """(cfg, params, tokenizer) of a train.py / finetune.py run folder.

    which="latest" takes the newest readable checkpoint, "best" the one with the
    lowest validation loss. The params are the model's pytree as saved (for a
    fine-tuning run, {"gpt": ..., "head": ...}).
    """
    from gptjax.config import GPTConfig
    from gptjax.data.tokenizer import load_tokenizer

    if which not in ("latest", "best"):
        raise ValueError(f"which={which!r} must be 'latest' or 'best'")
    run_dir = Path(run_dir)
    config_path = run_dir / RUN_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a gptjax run folder (no {RUN_CONFIG})")
    run_config = json.loads(config_path.read_text())
    cfg = GPTConfig.from_dict(run_config["model"], where=str(config_path))
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {ckpt.directory}")
        order = steps[::-1]
        if which == "best":
            best = best_step(ckpt)
            order = [best] if best is not None else order
        failures = []
        for step in order:
            try:
                state = ckpt.manager.restore(
                    step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(_one_device_target(ckpt, step)))
                )["state"]
                break
            except Exception as err:
                failures.append(f"step {step}: {type(err).__name__}")
                log.warning("checkpoint step %s of %s is unreadable: %s", step, run_dir, err)
        else:
            raise CheckpointError(f"no readable checkpoint in {ckpt.directory}: {failures}")
    finally:
        ckpt.close()
    params = jax.tree_util.tree_map(jax.numpy.asarray, state["params"])
    tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    return cfg, params, tokenizer
