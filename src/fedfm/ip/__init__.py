"""IP PROTECTION: watermarks embedded in the federation's model and checked on a suspect.

- ``waffle`` (server step, stage ``model``): WAFFLE's re-training of each new global model
  on a trigger set generated from a secret key (``trigger.py``, ``embed.py``, ``waffle.py``);
- client-unique copies and leak tracing, DUW-inspired (``unique.py``), sent to each
  client by the ``client_watermark`` server step (``copies.py``);
- verification: watermark accuracy and a binomial p-value against chance (``verify.py``),
  on a run directory or a final.safetensors (``loading.py``; CLI ``fedfm watermark``);
- a thief's removal attacks for evaluation (``removal.py``). See docs/ip.md.
"""

from fedfm.ip.embed import EmbedResult, EmbedSettings, embed
from fedfm.ip.trigger import TriggerSpec, chance, client_key, key_seed, trigger_set
from fedfm.ip.unique import Base, Trace, client_copy, trace, trace_keys
from fedfm.ip.verify import Verdict, count_hits, p_value, verdict
from fedfm.ip.waffle import Waffle, WaffleParams  # registers the waffle server step
from fedfm.ip.copies import ClientWatermark, ClientWatermarkParams  # registers client_watermark

__all__ = [
    "Base",
    "ClientWatermark",
    "ClientWatermarkParams",
    "EmbedResult",
    "EmbedSettings",
    "Trace",
    "TriggerSpec",
    "Verdict",
    "Waffle",
    "WaffleParams",
    "chance",
    "client_copy",
    "client_key",
    "count_hits",
    "embed",
    "key_seed",
    "p_value",
    "trace",
    "trace_keys",
    "trigger_set",
    "verdict",
]
