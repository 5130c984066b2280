"""Learning-rate transfer across width: the standard parametrization against muP.

    python -m gptjax.scaling.mup_transfer                   # 3 widths x 5 rates x 2, CPU
    python -m gptjax.scaling.mup_transfer --widths 128,256,512,1024 --n-layer 8 \\
        --log2-lrs=-13,-12,-11,-10,-9,-8,-7 --steps 2000 --batch-size 64   # on a GPU

Every model of the sweep is the same GPT (n_layer, n_head, n_ctx) at several widths,
trained on the built-in corpus with the same data order, seed and recipe (AdamW, linear
warm-up, cosine decay to min_lr_ratio x the peak) for a fixed number of steps, at each
peak learning rate of a log-spaced grid, once under the standard parametrization and once
under muP with the narrowest width as its base (gptjax.mup; at that width the two are the
same model). Yang et al. 2021 ("Tensor Programs V") predict that under muP the best rate
of the narrowest model stays best at the widest, while under the standard one it drifts
to smaller rates as the width grows. The final validation loss of every run goes to
OUT_DIR/mup_transfer.json, a table to stdout, and loss against rate to mup_transfer.png.
Besides the best grid rate, each width's optimum is located between grid points by a
parabola in log2(rate) through the best point and its two neighbours.

The runs are train.py's step (gptjax.train.step.make_train_step over make_optimizer, with
muP's per-parameter rates), driven by a short loop here rather than train.py's run
folders. The peak rate sits in the optimizer state (optax.inject_hyperparams scaling the
updates of make_optimizer at lr = 1), so one compiled step serves every rate of a width.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import optax

from gptjax.config import GPTConfig
from gptjax.data.corpus import eval_batches, load_texts, prepare_tokens, train_batch
from gptjax.data.tokenizer import build_tokenizer
from gptjax.model import init_params, lm_loss
from gptjax.train.optim import OptimConfig, make_optimizer, make_schedule
from gptjax.train.step import init_state, make_train_step

PARAMETRIZATIONS = ("standard", "mup")


@dataclass(frozen=True)
class TransferConfig:
    """The sweep: widths x peak learning rates x {standard, muP}."""

    # Model widths (n_embd), comma-separated; the narrowest is muP's base width.
    widths: str = "64,128,256"
    # Peak learning rates as powers of two, comma-separated: -9 is 2^-9 = 0.00195.
    log2_lrs: str = "-11,-10,-9,-8,-7"
    # Depth, heads and context of every model.
    n_layer: int = 4
    n_head: int = 4
    n_ctx: int = 64
    # Optimizer steps per run and sequences per step.
    steps: int = 150
    batch_size: int = 8
    # Linear warm-up over this share of the steps, then cosine decay.
    warmup_fraction: float = 0.1
    # The rate at the last step, as a share of the peak.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b2: float = 0.99
    # Tokenizer built from the built-in corpus: "char" or "byte".
    tokenizer: str = "char"
    # Validation batches (of batch_size windows) for the final loss.
    eval_batches: int = 16
    # Seed of the initial parameters and of the batch order (the same for every run).
    seed: int = 0
    # Output folder: mup_transfer.json, mup_transfer.png and the token files.
    out_dir: str = "runs/mup_transfer"

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_ctx", "steps", "batch_size", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.tokenizer not in ("char", "byte"):
            raise ValueError(f"tokenizer={self.tokenizer!r} must be 'char' or 'byte'")
        if not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must lie in [0, 1]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        for width in self.width_list():
            if width % self.n_head:
                raise ValueError(f"widths: {width} is not a multiple of n_head={self.n_head}")
        if len(self.lr_list()) < 2:
            raise ValueError(f"log2_lrs={self.log2_lrs!r}: give at least two learning rates")

    def width_list(self) -> list[int]:
        widths = _numbers("widths", self.widths, int)
        if any(w < 1 for w in widths):
            raise ValueError(f"widths={self.widths!r} must be positive")
        return sorted(widths)

    def lr_list(self) -> list[float]:
        return sorted(2.0 ** e for e in _numbers("log2_lrs", self.log2_lrs, float))

    @property
    def base_width(self) -> int:
        return self.width_list()[0]


def _numbers(name: str, text: str, kind) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{name}={text!r} must be comma-separated numbers") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name}={text!r} must be finite numbers, comma-separated")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}={text!r} repeats a value")
    return values


def model_config(settings: TransferConfig, width: int, parametrization: str,
                 vocab_size: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=vocab_size, n_ctx=settings.n_ctx, n_layer=settings.n_layer,
        n_head=settings.n_head, n_embd=width, embd_pdrop=0.0, attn_pdrop=0.0,
        resid_pdrop=0.0, norm="pre", scan_layers=False, kernels="auto",
        parametrization=parametrization, mup_base_width=settings.base_width)


def optim_config(settings: TransferConfig) -> OptimConfig:
    """The recipe at peak rate 1; each run's peak multiplies it (with_peak_lr)."""
    return OptimConfig(lr=1.0, min_lr=settings.min_lr_ratio,
                       warmup_steps=round(settings.warmup_fraction * settings.steps),
                       schedule="cosine", b2=settings.b2, weight_decay=settings.weight_decay)


def with_peak_lr(optim: OptimConfig, steps: int, model: GPTConfig, lr: float):
    """make_optimizer's AdamW at peak rate 1 (muP's per-parameter rates included), its
    updates times `lr`, a number held in the optimizer state: the same updates as
    make_optimizer at peak rate lr, and one compiled step for every lr."""
    return optax.chain(make_optimizer(optim, steps, model=model),
                       optax.inject_hyperparams(optax.scale)(step_size=lr))


def run_sweep(settings: TransferConfig, *, quiet: bool = False) -> dict:
    """Train every (parametrization, width, lr) run; returns the record written to JSON."""
    out = Path(settings.out_dir)
    texts = load_texts(None)
    tokenizer = build_tokenizer(settings.tokenizer, texts)
    tokens = prepare_tokens(texts, tokenizer, out / "tokens", progress=False)
    val = list(eval_batches(tokens.val, batch_size=settings.batch_size,
                            context=settings.n_ctx, max_batches=settings.eval_batches))
    optim = optim_config(settings)
    schedule = make_schedule(optim, settings.steps)  # at peak 1: the step's logged "lr"
    runs = []
    for parametrization in PARAMETRIZATIONS:
        for width in settings.width_list():
            cfg = model_config(settings, width, parametrization, tokenizer.vocab_size)
            params = init_params(cfg, jax.random.PRNGKey(settings.seed))

            def loss_fn(p, batch, rng, cfg=cfg):
                return lm_loss(p, batch["tokens"], cfg, train=True, rng=rng), {}

            # (every rate's run starts from these same parameters: no buffer donation)
            step = jax.jit(make_train_step(loss_fn, with_peak_lr(optim, settings.steps, cfg,
                                                                 1.0), schedule))
            evaluate = jax.jit(lambda p, t, cfg=cfg: lm_loss(p, t, cfg))
            for lr in settings.lr_list():
                start = time.perf_counter()
                state = init_state(params, with_peak_lr(optim, settings.steps, cfg, lr),
                                   settings.seed)
                for s in range(settings.steps):
                    batch = train_batch(tokens.train, seed=settings.seed, step=s,
                                        batch_size=settings.batch_size, context=settings.n_ctx)
                    state, metrics = step(state, {"tokens": batch[None]})
                val_loss = float(np.mean([float(evaluate(state["params"], b)) for b in val]))
                run = {"parametrization": parametrization, "width": width, "lr": lr,
                       "val_loss": val_loss if math.isfinite(val_loss) else None,
                       "train_loss": float(metrics["loss"]),
                       "skipped_steps": int(state["skipped"]),
                       "seconds": round(time.perf_counter() - start, 1)}
                runs.append(run)
                if not quiet:
                    print(f"{parametrization:8s} width {width:4d} lr {lr:.2e}: validation "
                          f"loss {_loss_text(run['val_loss'])} ({run['seconds']:.0f} s)",
                          flush=True)
    record = {"settings": dataclasses.asdict(settings), "vocab_size": tokenizer.vocab_size,
              "backend": jax.default_backend(), "runs": runs,
              "best": best_rates(runs)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "mup_transfer.json").write_text(json.dumps(record, indent=2))
    plot_transfer(record, out / "mup_transfer.png")
    return record


def fitted_optimum(points: Sequence[tuple[float, float]]) -> float | None:
    """The rate of least loss between grid points: the vertex of the parabola in log2(rate)
    through the best (rate, loss) point and its two neighbours. None when the best point
    is at an end of the grid or the three points do not curve upwards."""
    points = sorted(points)
    i = min(range(len(points)), key=lambda k: points[k][1])
    if i == 0 or i == len(points) - 1:
        return None
    x = np.log2([lr for lr, _ in points[i - 1:i + 2]])
    a, b, _ = np.polyfit(x, [loss for _, loss in points[i - 1:i + 2]], 2)
    return float(2.0 ** (-b / (2 * a))) if a > 0 else None


def best_rates(runs: Sequence[dict]) -> dict:
    """{parametrization: {width (str): {"lr": the grid rate of least finite validation loss,
    "val_loss": that loss, "fitted_lr": fitted_optimum's rate or None}}}."""
    best: dict = {}
    for parametrization in PARAMETRIZATIONS:
        for width in sorted({r["width"] for r in runs}):
            points = [(r["lr"], r["val_loss"]) for r in runs
                      if r["parametrization"] == parametrization and r["width"] == width
                      and r["val_loss"] is not None]
            if points:
                lr, loss = min(points, key=lambda point: point[1])
                best.setdefault(parametrization, {})[str(width)] = {
                    "lr": lr, "val_loss": loss, "fitted_lr": fitted_optimum(points)}
    return best


def _loss_text(loss: float | None) -> str:
    return "diverged" if loss is None else f"{loss:.4f}"


def _log2_text(lr: float | None) -> str:
    return "edge" if lr is None else f"2^{round(math.log2(lr), 2):g}"


def format_table(record: dict) -> str:
    """Final validation loss per parametrization, width and rate (* marks each row's
    least), each row's best grid rate and its fitted optimum, and a summary per
    parametrization."""
    runs, best = record["runs"], record["best"]
    lrs = sorted({r["lr"] for r in runs})
    head = (f"{'':10s}{'width':>6s}" + "".join(f"{_log2_text(lr):>10s}" for lr in lrs)
            + f"{'best':>10s}{'fitted':>10s}")
    lines = ["final validation loss (nats/token) by peak learning rate", head]
    for parametrization in PARAMETRIZATIONS:
        for width in sorted({r["width"] for r in runs}):
            cells = {r["lr"]: r["val_loss"] for r in runs
                     if r["parametrization"] == parametrization and r["width"] == width}
            if not cells:
                continue
            chosen = best.get(parametrization, {}).get(str(width))
            mark = {lr: "*" if chosen and lr == chosen["lr"] else " " for lr in lrs}
            text = "".join(f"{_loss_text(cells.get(lr)) + mark[lr]:>10s}" for lr in lrs)
            tail = (f"{_log2_text(chosen['lr']):>10s}{_log2_text(chosen['fitted_lr']):>10s}"
                    if chosen else f"{'-':>10s}{'-':>10s}")
            lines.append(f"{parametrization:10s}{width:6d}{text}{tail}")
    for parametrization in PARAMETRIZATIONS:
        chosen = best.get(parametrization, {})
        if not chosen:
            continue
        widths = sorted(chosen, key=int)
        grid = ", ".join(_log2_text(chosen[w]["lr"]) for w in widths)
        fitted = ", ".join(_log2_text(chosen[w]["fitted_lr"]) for w in widths)
        verdict = ("stays" if len({chosen[w]["lr"] for w in widths}) == 1 else "moves")
        lines.append(f"{parametrization}: best grid rate {verdict} across widths "
                     f"{', '.join(widths)}: {grid} (fitted: {fitted})")
    return "\n".join(lines)


def plot_transfer(record: dict, path: str | Path) -> Path:
    """Two panels (standard, muP): validation loss against peak rate, one line per width,
    each width's best rate marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    colors = plt.get_cmap("viridis")
    finite = [r["val_loss"] for r in record["runs"] if r["val_loss"] is not None]
    for ax, parametrization in zip(axes, PARAMETRIZATIONS):
        runs = [r for r in record["runs"] if r["parametrization"] == parametrization]
        widths = sorted({r["width"] for r in runs})
        for i, width in enumerate(widths):
            points = sorted((r["lr"], r["val_loss"]) for r in runs
                            if r["width"] == width and r["val_loss"] is not None)
            if not points:
                continue
            color = colors(i / max(len(widths) - 1, 1))
            lrs, losses = zip(*points)
            ax.plot(lrs, losses, "o-", color=color, label=f"width {width}")
            best = record["best"].get(parametrization, {}).get(str(width))
            if best is not None:
                ax.plot([best["lr"]], [best["val_loss"]], "*", color=color, markersize=16,
                        markeredgecolor="black")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak learning rate")
        ax.set_title("standard parametrization" if parametrization == "standard" else
                     f"muP (base width {min(r['width'] for r in record['runs'])})")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("final validation loss (nats/token)")
    if finite:
        low = min(finite)
        axes[0].set_ylim(low - 0.05, min(max(finite), low + 1.5) + 0.05)
    fig.suptitle(f"learning-rate transfer across width ({record['settings']['steps']} steps, "
                 f"{record['settings']['n_layer']} layers, context {record['settings']['n_ctx']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    from gptjax.cli import settings as cli

    command = cli.Command(
        prog="python -m gptjax.scaling.mup_transfer",
        description="Learning-rate transfer across width: the best learning rate of each "
        "width under the standard parametrization and under muP.",
        sections={"sweep": TransferConfig},
        metavars={"widths": "W1,W2,...", "log2_lrs": "E1,E2,..."},
    )

    def run(argv) -> int:
        def resolve(options, command_line):
            return cli.resolve(command.sections, command_line=command_line,
                               config=options.config)

        settings = command.parse(argv, resolve)[1].sections["sweep"]
        start = time.perf_counter()
        record = run_sweep(settings)
        print(format_table(record))
        print(f"{len(record['runs'])} runs in {time.perf_counter() - start:.0f} s; wrote "
              f"{Path(settings.out_dir) / 'mup_transfer.json'} and mup_transfer.png")
        return 0

    return cli.main_wrapper(run, argv)


if __name__ == "__main__":
    sys.exit(main())
