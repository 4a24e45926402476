"""HOW A CLIENT LEARNS: local loops and client algorithms."""

from fedfm.learners.base import Learner, LocalContext, build_learner, learners, register_learner
from fedfm.learners.loop import train_loop
from fedfm.learners import local  # noqa: F401  (registers 'local')
from fedfm.learners import fedprox, feddyn, scaffold  # noqa: F401  (register fedprox, feddyn, scaffold)
from fedfm.learners import delay  # noqa: F401  (registers the 'delay' middleware)
from fedfm.learners import mezo, fedkseed, fedbpt, bdpl  # noqa: F401  (register mezo, fedkseed, fedbpt, bdpl)
from fedfm.learners import fedra, hetrank, split  # noqa: F401  (register hetlora, flexlora, fedra, split)
from fedfm.learners import splitfed  # noqa: F401  (registers learner and exchange splitfed)
from fedfm.learners import flash, prunefl  # noqa: F401  (register learners flash and prunefl)

__all__ = ["Learner", "LocalContext", "build_learner", "learners", "register_learner", "train_loop"]
