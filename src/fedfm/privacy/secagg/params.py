"""The YAML parameters of ``exchanges: [{name: secagg, ...}]`` and its simulated
dropouts between phases.

Dropouts: ``faults.dropout`` of the run keeps its meaning (a sampled client drops before
the round, so it never advertises keys). Besides, a client may drop in any phase of the
secure-aggregation round: ``dropout: {unmask: 0.1}`` draws, like ``faults.dropout``
(``runtime.faults.drops_out``), from (seed, round, attempt, client) with a per-phase tag;
``drop: [{phase: train, cids: [2], rounds: [1]}]`` drops given clients for tests and
demos. A dropped client raises in that phase on its own side, so the server sees what a
real dropout looks like (no reply) on every transport.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedfm.core.seeding import derive_seed
from fedfm.privacy.secagg.common import default_threshold
from fedfm.privacy.secagg.graph import holders
from fedfm.runtime.fault_outlook import Stage
from fedfm.runtime.faults import drops_out

Phase = Literal["advertise", "share", "route", "train", "unmask"]
PHASES: tuple[str, ...] = ("advertise", "share", "route", "train", "unmask")
PHASE_TAG = {p: 0x5EC0 + i for i, p in enumerate(PHASES)}


class DropSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phase: Phase = Field(..., description="the phase in which these clients drop")
    cids: list[int] = Field(..., min_length=1, description="the clients that drop")
    rounds: list[int] | None = Field(None, description="the rounds in which they drop (all rounds when omitted)")


class SecAggParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # an infinite sigma or norm is refused by name
    bound: float = Field(..., gt=0, description="clipping range: every coordinate of w * update is clipped to [-bound, bound] before encoding")
    frac_bits: int = Field(16, ge=0, le=30, description="fixed point: a coordinate x becomes round(x * 2^frac_bits)")
    bits: int = Field(24, ge=8, le=24, description="the sum is taken modulo 2^bits; masked words travel as float32 values, exact below 2^24")
    threshold: int | None = Field(None, ge=1, description="t of Shamir t-of-n, at least 2; default max(2, n - floor(n/3)) of the n "
                                  "holders of a client's shares (the clients keyed, or with neighbours k: min(n, k + 1))")
    neighbours: int | None = Field(None, ge=2, description="SecAgg+ (Bell et al. 2020): each client shares with and masks against "
                                   "only its k neighbours of a Harary graph H(k, n) (even k); default every other client (SecAgg)")
    weighting: Literal["num_examples", "uniform"] = Field(
        "num_examples", description="num_examples: each client sends n_i * update and n_i inside the masked vector (FedAvg); uniform: weight 1")
    dropout: dict[Phase, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="per-phase probability that a client drops in that phase")
    drop: list[DropSpec] = Field(default_factory=list, description="clients that drop in a given phase (tests, demos)")

    @field_validator("neighbours")
    @classmethod
    def _even(cls, k: int | None) -> int | None:
        if k is not None and k % 2:
            raise ValueError(f"neighbours {k} is odd: the Harary graph links each client to k/2 on either side of a ring, so k is even")
        return k


def simulated_drop(p: SecAggParams, phase: str, seed: int, rnd: int, attempt: int, cid: int) -> bool:
    """Whether client ``cid`` drops in ``phase`` of this round attempt."""
    for d in p.drop:
        if d.phase == phase and cid in d.cids and (d.rounds is None or rnd in d.rounds):
            return True
    return drops_out(float(p.dropout.get(phase, 0.0)), derive_seed(seed, PHASE_TAG[phase]), rnd, attempt, cid)


def dropout_stages(p: SecAggParams, n: int) -> list[Stage]:
    """Where a client drops at random (``dropout``) in a round whose phases began with ``n``
    clients, for the dropout outlook (``runtime/fault_outlook.py``): every phase needs t
    left (the threshold, fixed from ``n``); the ``train`` draw decides the masked inputs
    U3; ``unmask`` needs t of U3 to answer. The fixed ``drop`` list is not counted. With
    ``neighbours``, a neighbourhood left below t or a graph cut by dropped clients
    (``graph.py``) also fail a round: ``outlook.estimate`` counts them."""
    t = p.threshold or default_threshold(holders(n, p.neighbours))
    when = {"train": "train", "unmask": "after_train"}
    return [Stage(ph, float(p.dropout.get(ph, 0.0)), t, when.get(ph, "before_train")) for ph in PHASES]


class SimulatedDropout(RuntimeError):
    """A client that drops in a phase of secure aggregation (``dropout`` / ``drop``)."""
