"""Checkpoints of the whole train state with orbax, and loading a finished run.

A checkpoint holds the parameters, the optimizer state, the step, the RNG key
and the NaN counters (one pytree), plus JSON metadata: the model config, the
tokenizer fingerprint, the data fingerprint, the metrics of that step and a
checksum of every array. It is saved un-replicated (one copy of each array), so
a run saved on 8 devices restores on 1 and the other way round.

    checkpoints/4/                  step 4: state/ (orbax arrays), meta/ (JSON)
    checkpoints/6.orbax-checkpoint-tmp   a save in progress (renamed to 6/ when complete)
    checkpoints/2.corrupt-20250101-120000   moved aside: could not be read
    checkpoints/8.incomplete-20250101-120000  moved aside: a save a kill interrupted

orbax writes each step into a temporary folder and renames it when complete, so
a killed process leaves no half checkpoint that looks finished. When a run
resumes, a temporary folder left by a kill is moved aside as `N.incomplete-TIME`,
and a step folder that cannot be read (files missing, truncated or damaged, which
the checksum catches when orbax does not) as `N.corrupt-TIME`, each with one
warning naming it; the previous step is used, and the resumed run saves step N
again when it gets there. Nothing is deleted, and a run never silently starts
from scratch: with no readable step the error names every step tried. A
checkpoint that reads fine but holds a different train state (another model or
optimizer) is an error and stays where it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from gptjax.train import parallel as par

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"
# orbax's suffix of a step folder being written (renamed to the step when complete).
UNFINISHED_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not match the run."""


class _Unreadable(Exception):
    """A step folder whose files cannot be read back as the state they were saved from."""


# ----------------------------------------------------------------------------- checksum


def _word_sums(x) -> tuple[jax.Array, jax.Array]:
    """(sum of x's words, sum of word * (its flat index + 1)), both mod 2**32.

    The words are x's bits as unsigned integers (one per element; two per 8-byte
    element). Integer sums do not depend on the order of the additions, so the result
    is the same for any device layout; the index weight makes a moved word count too.
    """
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the flat index, without a reshape that
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)  # would gather
        index = index + iota * jnp.uint32(stride % 2**32)  # a sharded array
        stride *= words.shape[axis]
    return jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * (index + 1), dtype=jnp.uint32)


_word_sums_of_leaves = jax.jit(lambda leaves: [_word_sums(x) for x in leaves])


def state_checksum(tree) -> str:
    """A checksum of every array of `tree` (its values and their order), the same
    wherever the arrays live (one device, replicated, or sharded over processes)."""
    sums = par.to_host(_word_sums_of_leaves(jax.tree_util.tree_leaves(tree)))
    digest = hashlib.sha256()
    for total, weighted in sums:
        digest.update(np.asarray([total, weighted], np.uint32).tobytes())
    return digest.hexdigest()[:32]


# ----------------------------------------------------------------------------- structure


def _is_array_meta(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _shapes(tree) -> dict[str, tuple]:
    """{leaf name: (shape, dtype)} of arrays, ShapeDtypeStructs or orbax array metadata."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_meta)[0]
    return {".".join(par.path_names(path)): (tuple(x.shape), np.dtype(x.dtype))
            for path, x in flat}


def _difference(saved: dict, wanted: dict) -> str | None:
    """What differs between a checkpoint's arrays and the ones a run restores into."""
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    changed = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    parts = []
    if missing:
        parts.append(f"the run has {missing[:3]} the checkpoint lacks")
    if extra:
        parts.append(f"the checkpoint has {extra[:3]} the run lacks")
    for k in changed[:3]:
        parts.append(f"{k}: checkpoint {saved[k][0]} {saved[k][1]} vs run "
                     f"{wanted[k][0]} {wanted[k][1]}")
    return "; ".join(parts) or None


# ----------------------------------------------------------------------------- checkpointer


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _free_name(folder: Path, stem: str) -> Path:
    """folder/stem, or folder/stem-2, -3, ... if that exists."""
    path, n = folder / stem, 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}"
    return path


class Checkpointer:
    """Saves every N steps, keeps the last `keep` and the best by validation loss.

    read_only=True (loading a run, checking before a resume) creates, moves and
    deletes nothing: unreadable steps are only skipped.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        if not read_only:
            self._set_aside_unfinished()
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save and not read_only,
            # orbax would delete the folders of unfinished saves; _set_aside_unfinished
            # has moved them aside instead.
            cleanup_tmp_directories=False,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            # Named handlers let orbax read an item's metadata (the saved tree) without
            # guessing, and without the warnings it prints when it has to.
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    # -------------------------------------------------------------- saving

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Start saving (asynchronously); arrays are copied off the device before it
        returns. The metadata gets the step, its metrics and the state's checksum."""
        saved_metrics = None
        if metrics and "val_loss" in metrics:
            saved_metrics = {"val_loss": float(metrics["val_loss"])}
        meta = {**meta, "step": int(step), "metrics": metrics or {},
                "checksum": state_checksum(state)}
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

    # -------------------------------------------------------------- reading

    def restore_meta(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def saved_shapes(self, step: int):
        """The saved state's tree of orbax array metadata (shape, dtype, ...), read from
        the step's own metadata files; no arrays are read."""
        tree = self.manager.item_metadata(step)["state"]
        if tree is None:
            raise FileNotFoundError(f"no state metadata in {self.directory / str(step)}")
        return getattr(tree, "tree", tree)

    def restore(self, target: Any, step: int | None = None,
                check: Callable[[dict, int], None] | None = None) -> tuple[Any, dict, int]:
        """Restore into the structure of `target` (arrays or ShapeDtypeStructs).

        With no step, the newest readable one: an unreadable step is moved aside as
        `N.corrupt-TIME` (only skipped when read_only) with a warning, and the next
        older one is tried. `check(meta, step)` runs on the metadata before the arrays
        are read, so a mismatched model is reported as such (its errors propagate); a
        checkpoint whose arrays differ from the target's in name, shape or dtype (other
        optimizer settings) raises CheckpointError. Returns (state, meta, step).
        """
        steps = [step] if step is not None else self.steps()[::-1]
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        failures = []
        for s in steps:
            try:
                state, meta = self._read(s, abstract, check)
                problem = None
            except _Unreadable as err:
                problem = str(err)
            if not par.on_every_process(problem is None):
                problem = problem or "unreadable on another process"
                failures.append(f"step {s}: {problem}")
                if step is None:
                    self._set_aside(s, problem)
                continue
            if failures:
                log.info("restored step %s of %s", s, self.directory)
            return state, meta, s
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}; tried " + "; ".join(failures)
        )

    def _read(self, step: int, abstract, check) -> tuple[Any, dict]:
        """(state, meta) of one step; _Unreadable when its files cannot be read back as
        what was saved (errors of `check` and a structure mismatch propagate)."""
        try:
            meta = self.restore_meta(step)
            saved = _shapes(self.saved_shapes(step))
        except Exception as err:  # orbax raises many types for a bad folder
            raise _Unreadable(f"{type(err).__name__}: {str(err)[:200]}") from err
        if check is not None:
            check(meta, step)
        difference = _difference(saved, _shapes(abstract))
        if difference:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} holds another train state "
                f"than this run builds ({difference}); were the model or optimizer "
                "settings changed?")
        try:
            state = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        except Exception as err:
            raise _Unreadable(f"{type(err).__name__}: {str(err)[:200]}") from err
        if "checksum" in meta and state_checksum(state) != meta["checksum"]:
            raise _Unreadable("its arrays do not match the checksum saved with them")
        return state, meta

    # -------------------------------------------------------------- moving aside

    def _set_aside(self, step: int, problem: str) -> None:
        """Move an unreadable step folder to N.corrupt-TIME (read_only: only warn)."""
        if self.read_only:
            log.warning("checkpoint step %s in %s cannot be read (%s); trying an older one",
                        step, self.directory, problem)
            return
        if par.is_primary():  # one process renames; every process agreed on the step
            moved = _free_name(self.directory, f"{step}.corrupt-{_timestamp()}")
            (self.directory / str(step)).rename(moved)
            log.warning("checkpoint step %s cannot be read (%s); moved it to %s and trying "
                        "an older one", step, problem, moved)
        par.barrier(f"checkpoint {step} set aside")
        self.manager.reload()

    def _set_aside_unfinished(self) -> None:
        """Move the folders of saves a kill interrupted to N.incomplete-TIME: orbax would
        refuse to save step N again while one exists (or delete it, when asked to)."""
        if par.is_primary() and self.directory.is_dir():
            for folder in sorted(self.directory.iterdir()):
                if UNFINISHED_SUFFIX not in folder.name:
                    continue
                stem = folder.name.split(UNFINISHED_SUFFIX)[0]
                moved = _free_name(self.directory, f"{stem}.incomplete-{_timestamp()}")
                folder.rename(moved)
                log.warning("%s is a save that did not finish (the process was stopped while "
                            "writing it); moved it to %s", folder, moved)
        par.barrier("unfinished checkpoints set aside")


# ----------------------------------------------------------------------------- runs
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
    ckpt = Checkpointer(Path(run_dir) / CHECKPOINT_DIR, read_only=True)
    try:
        steps = ckpt.steps()
        if not steps:
            raise CheckpointError(f"--resume: no checkpoint in {ckpt.directory}")
        for step in steps[::-1]:
            try:
                saved = ckpt.restore_meta(step)
            except Exception:  # unreadable: restore() will set it aside and fall back
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
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        ckpt.saved_shapes(step), is_leaf=_is_array_meta)


def load_run(run_dir: str | Path, *, which: str = "latest"):
    """(cfg, params, tokenizer) of a train.py / finetune.py run folder.

    which="latest" takes the newest readable checkpoint, "best" the one with the
    lowest validation loss. The params are the model's pytree as saved (for a
    fine-tuning run, {"gpt": ..., "head": ...}). Nothing in the folder is changed.
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
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, read_only=True)
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
                state, _, _ = ckpt.restore(_one_device_target(ckpt, step), step=step)
                break
            except Exception as err:  # unreadable metadata, or restore's CheckpointError
                failures.append(f"step {step}: {type(err).__name__}")
                log.warning("checkpoint step %s of %s is unreadable: %s", step, run_dir, err)
        else:
            raise CheckpointError(f"no readable checkpoint in {ckpt.directory}: {failures}")
    finally:
        ckpt.close()
    params = jax.tree_util.tree_map(jax.numpy.asarray, state["params"])
    tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    return cfg, params, tokenizer
