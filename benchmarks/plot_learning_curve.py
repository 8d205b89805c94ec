"""Plot a training run's learning curve (validation Dice and losses per epoch) from its log.csv.

python benchmarks/plot_learning_curve.py RUN_DIR/log.csv docs/learning_curve.png
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def main(log_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with Path(log_path).open() as handle:
        rows = list(csv.DictReader(handle))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [float(r["val_dice"]) for r in rows], "o-", label="validation reconstruction Dice (1 mm)")
    left.axhline(0.85, color="grey", linestyle="--", linewidth=1, label="0.85")
    left.set_xlabel("epoch")
    left.set_ylabel("Dice")
    left.set_ylim(0.5, 1.0)
    left.legend(loc="lower right")
    right.plot(epochs, [float(r["recon"]) for r in rows], "o-", label="train reconstruction BCE")
    right.plot(epochs, [float(r["val_recon"]) for r in rows], "s-", label="validation reconstruction BCE")
    right.set_xlabel("epoch")
    right.set_yscale("log")
    right.legend(loc="upper right")
    hours = float(rows[-1]["time"]) / 3600
    fig.suptitle(f"{Path(log_path).parent.name}: {len(rows)} epochs, {hours:.2f} h of training")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"learning curve of {len(rows)} epochs written to {png_path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
