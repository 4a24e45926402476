"""Kept for imports written before ``derive_seed`` moved to ``fedfm.core.seeding``."""

from fedfm.core.seeding import derive_seed

__all__ = ["derive_seed"]
