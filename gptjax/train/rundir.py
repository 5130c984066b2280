"""Run folders: created fresh, continued with resume, or replaced with overwrite, never
reused by accident."""

from __future__ import annotations

import shutil
from pathlib import Path


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
