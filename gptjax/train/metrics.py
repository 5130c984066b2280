"""What a run records as it trains: metrics.jsonl (always), TensorBoard and W&B (when
asked, imported lazily), and the loss plot drawn from metrics.jsonl at the end."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON record per call to RUN_DIR/metrics.jsonl; also to TensorBoard
    event files (RUN_DIR/tensorboard, needs tensorboardX) and to a W&B project."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = False, wandb_project: str = "",
                 config: dict | None = None):
        self.file = open(Path(run_dir) / METRICS_FILE, "a")  # noqa: SIM115
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as err:
                raise ImportError("tensorboard=True needs `pip install tensorboardX`") from err
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("wandb_project needs `pip install wandb`") from err
            self.wandb = wandb.init(project=wandb_project, config=config or {},
                                    dir=str(run_dir))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
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
    for line in (Path(run_dir) / METRICS_FILE).read_text().splitlines():
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
    out = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
