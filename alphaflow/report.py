"""Tables and plots: the paper's tables with this project's numbers beside them (paper.md §8)."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path):
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(metrics_jsonl, out_png, title=""):
    """Loss decomposition (L_TFM, L_TC, their sum), the weighted loss and α(k) against the step."""
    records = read_jsonl(metrics_jsonl)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_alpha) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in records]
    for key in ("loss", "L_TFM", "L_TC", "L_sum"):
        ax_loss.plot(steps, [r.get(key) for r in records], label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_title(f"{title} losses")
    ax_loss.legend(fontsize=8)
    ax_alpha.plot(steps, [r.get("alpha") for r in records], color="k")
    ax_alpha.set_xlabel("step")
    ax_alpha.set_title("α(k)")
    ax_alpha.set_ylim(-0.05, 1.05)
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
