"""Reading a fine-tuning run's curves: did it overfit, from which epoch, and which weights were kept.

A run overfits when, for at least `patience` epochs after its lowest validation loss, the validation
loss stays above that minimum and ends more than `rise` (relative) above it, while the training loss
keeps falling (it ends below its value at the validation minimum). Overfitting started at the epoch
after the minimum. The weights a run keeps are its best validation-accuracy epoch's (`best_epoch`),
which can lie past that point: accuracy and loss disagree there, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PATIENCE = 3  # "several epochs"
RISE = 0.02  # the validation loss ends at least 2% above its minimum


@dataclass(frozen=True)
class Overfit:
    started: int  # first epoch after the validation-loss minimum
    min_epoch: int  # the epoch of the lowest validation loss
    last_epoch: int
    val_loss_min: float
    val_loss_last: float
    train_loss_at_min: float
    train_loss_last: float
    kept_epoch: int | None  # the epoch whose weights the run kept (best validation accuracy)

    def sentence(self) -> str:
        kept = ""
        if self.kept_epoch is not None:
            where = "after overfitting began" if self.kept_epoch >= self.started else "before overfitting began"
            kept = f"; weights kept: epoch {self.kept_epoch} (best validation accuracy, {where})"
        return (
            f"overfitting from epoch {self.started}: validation loss rose from {self.val_loss_min:.4f} (epoch "
            f"{self.min_epoch}) to {self.val_loss_last:.4f} (epoch {self.last_epoch}) while training loss fell "
            f"from {self.train_loss_at_min:.4f} to {self.train_loss_last:.4f}{kept}"
        )


def overfitting(
    history: list[dict[str, Any]], kept_epoch: int | None = None, patience: int = PATIENCE, rise: float = RISE
) -> Overfit | None:
    """The overfitting a run's history shows (see the module's docstring), or None."""
    rows = [h for h in history if h.get("val_loss") is not None and h.get("train_loss") is not None]
    if len(rows) < patience + 1:
        return None
    val = [float(h["val_loss"]) for h in rows]
    train = [float(h["train_loss"]) for h in rows]
    epochs = [int(h.get("epoch", i + 1)) for i, h in enumerate(rows)]
    m = min(range(len(val)), key=lambda i: (val[i], i))
    after = val[m + 1 :]
    if len(after) < patience or not all(v > val[m] for v in after):
        return None
    if val[-1] <= val[m] * (1 + rise) or train[-1] >= train[m]:
        return None
    return Overfit(epochs[m] + 1, epochs[m], epochs[-1], val[m], val[-1], train[m], train[-1], kept_epoch)
