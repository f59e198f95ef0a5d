"""Loss curves of a run as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def _smooth(values: list[float], n: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= n:
            acc -= values[i - n]
        out.append(acc / min(i + 1, n))
    return out


def plot_history(history: dict[str, list[float]], path: str | Path) -> Path:
    """One panel per logged quantity (moving average over ~1% of the run), log-scaled losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = history["step"]
    keys = [k for k in history if k != "step" and history[k]]
    n = max(1, len(steps) // 100)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = steps[len(steps) - len(history[key]):]  # GAN terms start later than the rest
        ax.plot(xs, history[key], alpha=0.25, lw=0.5)
        ax.plot(xs, _smooth(history[key], n), lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key in ("loss", "l1", "lpips") and min(history[key]) > 0:
            ax.set_yscale("log")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
