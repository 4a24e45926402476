"""WHO GETS WHAT: personal and dual adapters, personal prompts, client clustering."""

from fedfm.personalize import feddat  # noqa: F401  (registers the feddat learner)

__all__ = ["feddat"]
