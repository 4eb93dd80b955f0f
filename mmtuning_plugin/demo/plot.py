"""The demo's PNG: training loss and held-out accuracy (target and general) per arm (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for index, (name, arm) in enumerate(report["arms"].items()):
        colour = f"C{index}"
        if arm["loss"]:
            steps, losses = zip(*arm["loss"])
            loss_axis.plot(steps, losses, color=colour, label=arm["label"])
        steps = [point["step"] for point in arm["curve"]]
        accuracy_axis.plot(steps, [100 * p["target"] for p in arm["curve"]], color=colour, marker="o",
                           label=f"{arm['label']}: target")
        accuracy_axis.plot(steps, [100 * p["general"] for p in arm["curve"]], color=colour, marker="s",
                           linestyle="--", label=f"{arm['label']}: general")
    loss_axis.set(title="training loss (target task)", xlabel="step", ylabel="loss")
    accuracy_axis.set(title=f"held-out accuracy (seed {report['seed']})", xlabel="step", ylabel="accuracy %",
                      ylim=(-2, 102))
    loss_axis.legend(fontsize=8)
    accuracy_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
