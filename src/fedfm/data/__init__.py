"""WHERE DATA LIVES: sources (packaged corpora, local files) and partitioners."""

from fedfm.data.federated import Federation, build_federation, describe
from fedfm.data.labels import Labels, check_labels, resolve_labels
from fedfm.data.partition import partitioners, register_partitioner
from fedfm.data.sources import load_source, register_source, sources
from fedfm.data import text_corpora  # noqa: F401  (registers shakespeare, fortunes, jsonl)
from fedfm.data import preferences  # noqa: F401  (registers preferences)
from fedfm.data import politics, domains  # noqa: F401  (registers politics, by_domain)

__all__ = [
    "Federation",
    "build_federation",
    "check_labels",
    "describe",
    "Labels",
    "load_source",
    "partitioners",
    "register_partitioner",
    "register_source",
    "resolve_labels",
    "sources",
]
