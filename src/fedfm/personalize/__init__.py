"""WHO GETS WHAT: personal and dual adapters, personal prompts, client clustering."""

from fedfm.personalize import feddat, ifca  # noqa: F401  (register the feddat and ifca learners, ifca's server part)
from fedfm.personalize import cluster_report  # noqa: F401  (registers the cluster_report server step)
from fedfm.personalize import fedbfpt  # noqa: F401  (registers the fedbfpt learner)
from fedfm.personalize import fedapt  # noqa: F401  (registers the fedapt learner)
from fedfm.personalize import diprompt  # noqa: F401  (registers the diprompt learner and server part)
from fedfm.personalize import update_clusters  # noqa: F401  (registers the update_clusters learner and server part)
from fedfm.personalize.clustering import cluster_updates, ifca_choice, purity, spherical_kmeans

__all__ = ["cluster_updates", "ifca_choice", "purity", "spherical_kmeans"]
