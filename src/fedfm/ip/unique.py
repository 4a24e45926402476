"""Client-unique watermarks and leak tracing (DUW-inspired).

DUW (Shuyang Yu, Junyuan Hong, Yi Zeng, Fei Wang, Ruoxi Jia and Jiayu Zhou 2023, "Who
Leaked the Model? Tracking IP Infringers in Accountable Federated Learning", NeurIPS 2023
Workshop on Regulatable ML) gives every client a copy of the global model that
carries a key of its own, so that a leaked model names the client it came from, while the
federation's ownership stays verifiable. DUW embeds the keys with a decoder trained on the
server and a utility-preserving loss; that decoder is NOT implemented here. What is: each
client's copy is the broadcast State fine-tuned on the client's own trigger set (its key
``trigger.client_key(master, cid)``, the same embedding as WAFFLE's, ``embed.py``), and
``trace`` queries a leaked model with every client's trigger set and names the client
whose set it answers best. Its p-value is Bonferroni-adjusted for that choice: the
suspect is the best of N keys, so its own binomial p-value against chance (``p_raw``)
understates how often a model that carries no client key names somebody; the tracing
p-value is ``min(1, N * p_raw)``. With no key in the model, N = 8 keys of 32 triggers and
2 labels (each key's hits Binomial(32, 1/2), independent), the raw p is below 0.05 in
1 - (1 - P[X >= 22])^8 = 18.4% of models, the adjusted one in 1 - (1 - P[X >= 24])^8 =
2.8% (never more than 5%, whatever N). Any threshold on a trace uses the adjusted value.

Both are pure functions of (State, base model, keys): the caller owns the model. The
``client_watermark`` server step (``copies.py``) builds the copies in the round loop and
sends each client its own (docs/ip.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from fedfm.core.seeding import derive_seed
from fedfm.core.types import State
from fedfm.ip.embed import EmbedResult, EmbedSettings, embed
from fedfm.ip.trigger import TriggerSpec, client_key, trigger_set
from fedfm.ip.verify import Verdict, verdict
from fedfm.peft import set_state

DUW_TAG = 0xD0A


@dataclass(frozen=True)
class Base:
    """The one base model with the tuner applied, and what reads and trains it."""

    model: torch.nn.Module
    task: Any
    task_name: str
    tokenizer: Any


def client_copy(
    base: Base,
    full_state: State,
    master_key: str,
    cid: int,
    spec: TriggerSpec,
    settings: EmbedSettings,
    seed: int = 0,
    train_names: Sequence[str] | None = None,
) -> EmbedResult:
    """Client ``cid``'s watermarked copy of ``full_state`` (every trainable name)."""
    triggers = trigger_set(client_key(master_key, cid), spec, base.tokenizer)
    return embed(
        base.model, base.task, base.task_name, base.tokenizer, full_state, triggers, settings,
        seed=derive_seed(seed, cid, DUW_TAG), train_names=train_names,
    )


def bonferroni(p: float, tests: int) -> float:
    """``min(1, tests * p)``: the p-value of the best of ``tests`` tested keys."""
    if tests < 1:
        raise ValueError(f"bonferroni: needs at least one test, got {tests}")
    return min(1.0, tests * p)


@dataclass(frozen=True)
class Trace:
    suspect: Any  # the label (client id) whose key the model answers best
    verdicts: dict[Any, Verdict]

    @property
    def p_raw(self) -> float:
        """The suspect's own binomial p-value, as if its key had been chosen in advance."""
        return self.verdicts[self.suspect].p_value

    @property
    def p_value(self) -> float:
        """The tracing p-value: ``p_raw`` Bonferroni-adjusted for picking the best of the N keys."""
        return bonferroni(self.p_raw, len(self.verdicts))

    def verified(self, alpha: float) -> bool:
        """Whether the trace names its suspect at level ``alpha`` (on the adjusted p-value)."""
        return self.p_value < alpha


def trace_keys(base: Base, full_state: State, keys: Mapping[Any, str], spec: TriggerSpec) -> Trace:
    """Query the model loaded with ``full_state`` with each labelled key's trigger set;
    the suspect is the label with the most hits (ties: the first label)."""
    if not keys:
        raise ValueError("tracing needs at least one client key")
    set_state(base.model, full_state)
    verdicts = {
        label: verdict(base.task, spec, base.model, base.tokenizer, trigger_set(key, spec, base.tokenizer))
        for label, key in keys.items()
    }
    suspect = max(verdicts, key=lambda label: verdicts[label].hits)
    return Trace(suspect, verdicts)


def trace(base: Base, full_state: State, master_key: str, cids: Sequence[int], spec: TriggerSpec) -> Trace:
    """Which of clients ``cids`` (keys derived from ``master_key``) the model came from."""
    return trace_keys(base, full_state, {cid: client_key(master_key, cid) for cid in cids}, spec)
