"""Loss, accuracy and balanced accuracy of class logits, summed over evaluation batches
(the ``evaluate`` of the two classification tasks: ``text_classification`` and
``lm_classification``).

Balanced accuracy is the mean, over the labels present among the evaluated examples, of
the fraction of each label's examples predicted right (per-label recall, as scikit-learn's
``balanced_accuracy_score``). On a slice that leans one way, a model that answers one
label for everything scores that label's share in accuracy but 1 / (labels present) in
balanced accuracy: the figure that tells a learned task from a learned label prior, which
matters most for the per-client evaluation of personalized models (``eval.clients``).
Counted with two bincounts per batch instead of keeping every prediction for
scikit-learn, which is not a dependency.
"""

from __future__ import annotations

import torch


class ClassTally:
    """Add ``(logits (B, C), labels (B,))`` batch by batch; ``metrics()`` at the end."""

    def __init__(self) -> None:
        self.total, self.correct, self.loss_sum = 0, 0, 0.0
        self.seen: torch.Tensor | None = None  # examples per label
        self.hit: torch.Tensor | None = None  # examples per label predicted right

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        right = logits.argmax(-1) == labels
        self.correct += right.sum().item()
        self.total += len(labels)
        n = logits.shape[-1]
        seen = torch.bincount(labels.cpu(), minlength=n)
        hit = torch.bincount(labels[right].cpu(), minlength=n)
        self.seen = seen if self.seen is None else self.seen + seen
        self.hit = hit if self.hit is None else self.hit + hit

    def metrics(self) -> dict[str, float]:
        out = {"loss": self.loss_sum / max(self.total, 1), "accuracy": self.correct / max(self.total, 1)}
        if self.seen is not None and self.hit is not None and self.total:
            present = self.seen > 0
            out["balanced_accuracy"] = float((self.hit[present].double() / self.seen[present].double()).mean())
        return out
