"""scaling.png: a ladder's loss and accuracy against compute, the fits, the prediction and
the actual target (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _bar(prediction: dict, kind: str) -> list[list[float]]:
    """An interval as errorbar's yerr. A bootstrap interval need not contain the point
    prediction (nor, clipped to [0, 1], an accuracy's): the bar then ends at the point."""
    lo, hi = prediction[f"{kind}_interval"]
    point = prediction[kind]
    return [[max(point - lo, 0.0)], [max(hi - point, 0.0)]]


def plot_ladder(record: dict, fits, path: str | Path) -> Path:
    """Left: validation loss vs training FLOPs on log axes, the rungs, the fitted
    L(C) = a C^b + c with its band, the held-out rung's prediction, the target's
    prediction with its interval and the target's actual loss. Right: the same for
    accuracy (the two-step fit, compute -> loss -> accuracy), with chance marked. The
    loss fit of the other form (gptjax.scaling.ladder.LadderFits) is drawn dashed, its
    prediction as a hollow circle. fits may be None (too few rungs): the points alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs, target = record["rungs"], record.get("target")
    prediction, held = record.get("prediction"), record.get("held_out")
    has_accuracy = bool(rungs) and "accuracy" in rungs[0]
    fig, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(12 if has_accuracy else 6.5,
                                                                   4.8), squeeze=False)
    computes = [r["compute"] for r in rungs] + ([target["compute"]] if target else []) + (
        [prediction["compute"]] if prediction else [])
    grid = np.geomspace(min(computes) / 1.5, max(computes) * 1.5, 200)
    pct = round(100 * (prediction or held or {}).get("confidence", 0.9))

    loss_fit = fits.loss if fits is not None else None
    capability = fits.capability if fits is not None else None
    panels = [("val_loss", "loss", "validation loss (nats/token)", loss_fit)]
    if has_accuracy:
        panels.append(("accuracy", "accuracy", f"accuracy ({Path(record['task']['name']).name}, "
                       f"zero-shot, {record['task']['items']} items)", capability))
    for ax, (key, kind, label, fit) in zip(axes[0], panels):
        ax.scatter([r["compute"] for r in rungs], [r[key] for r in rungs], color="C0",
                   zorder=3, label="rungs")
        if fit is not None:
            lo, hi = fit.interval(grid)
            ax.fill_between(grid, lo, hi, color="C0", alpha=0.15,
                            label=f"fit, {pct}% band")
            ax.plot(grid, fit.predict(grid), color="C0", lw=1)
        if kind == "loss" and fits is not None:
            other = fits.other.to_dict()["form"]
            ax.plot(grid, fits.other.predict(grid), color="gray", lw=1, ls="--",
                    label=f"other form, {other[len('L(C) = '):]}")
            if prediction and "other" in prediction:
                ax.scatter([prediction["compute"]], [prediction["other"]["loss"]],
                           marker="o", facecolor="none", edgecolor="gray", zorder=4)
        if held and kind in held:
            ax.errorbar([held["compute"]], [held[kind]], yerr=_bar(held, kind),
                        fmt="s", mfc="none", color="C2", capsize=4,
                        label=f"{held['rung']} predicted from the others")
        if prediction and kind in prediction:
            ax.errorbar([prediction["compute"]], [prediction[kind]],
                        yerr=_bar(prediction, kind), fmt="D", mfc="none", color="C3",
                        capsize=5, label=f"target predicted ({pct}% interval)")
        if target and key in target:
            ax.scatter([target["compute"]], [target[key]], marker="*", s=160, color="C1",
                       zorder=4, label=f"target {target['name']}, actual")
        if kind == "accuracy" and record["task"].get("chance") is not None:
            ax.axhline(record["task"]["chance"], color="gray", ls=":", lw=1, label="chance")
        ax.set_xscale("log")
        if kind == "loss":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("training compute (FLOPs, 6N + 6LTD per token)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if loss_fit is not None:
        c = f" + {loss_fit.c:.3f}" if loss_fit.irreducible else ""
        axes[0][0].set_title(f"L(C) = {loss_fit.a:.3g} C^{loss_fit.b:.3f}{c}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
