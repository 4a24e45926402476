"""THREATS, for evaluation only: client middleware that misbehaves on purpose.

Attack code never lives in aggregators: an attacker is a client role whose middleware
(``learners/middleware.py``) changes what it trains on or what it sends.
"""

from fedfm.attacks import corrupt  # noqa: F401  (registers 'corrupt')
from fedfm.attacks import backdoor, label_flip, omniscient, untargeted  # noqa: F401  (poisoning attacks)
from fedfm.attacks import asr_probe, compromised_base  # noqa: F401  (backdoor_asr step; the planted base model)
from fedfm.attacks import label_recovery, membership  # noqa: F401  (privacy attacks: evaluation functions)

__all__ = ["asr_probe", "backdoor", "compromised_base", "corrupt", "label_flip", "omniscient", "untargeted"]
