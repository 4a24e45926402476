"""The algorithm, composed from the config: the one object every transport drives.

``build_algorithm(exp)`` reads the config once and hands each part only what it needs:

- a learner (client side: ``local``, ``fedprox``, ``feddyn``, ``scaffold``, ...), and the
  server half registered under the same name, if any (``aggregators/server_part.py``);
- an aggregation rule (``aggregator.rule``), a pure function over decoded deltas;
- the server pipeline's steps (``server_steps``) around it;
- a server optimizer (``server_optimizer.name``) with explicit moments.

Server state (``core.types.ServerState``) holds the global shared State under ``model``,
the server half's groups (``scaffold.c``, ``feddyn.h``), the optimizer's moments
(``opt.m``, ``opt.v``) and each step's own state (``step.<i>.<name>``); ``aggregate``
returns a new mapping and never mutates the one it was given, so a failure mid-way leaves
the previous server state intact.

Shared and local state: ``peft.local`` lists name patterns (``fnmatch``, e.g.
``classifier.*``) of trainable parameters that stay on the client (FedPer-style personal
heads). Only the other, shared names are in the server state and on the wire; the client
keeps its local part in the client store (``runtime/client.py``).

Per-client shapes (heterogeneous clients: HetLoRA, FlexLoRA, FedRA). A server part may
implement four per-client hooks (``aggregators/server_part.py``; None where unused):
``instruction(rnd, server_state, client, seed)`` builds one client's Instruction (its own
State, e.g. LoRA factors truncated to its rank, and config, e.g. its layers);
``client_reference(cid, profile, shared, config)`` gives the names and shapes that client
receives (``config``: the instruction's plain settings as they travel, e.g. FedRA's
allocated layers, so both ends agree; None outside a round);
``client_payload_spec(instruction, shared)`` what it may send back given what it was
issued; ``combine_updates(server_state, updates, rule, rule_params, ctx)`` replaces
"deltas over the global names -> rule -> combine" for payloads of different shapes. The
last instruction issued to (server side) or received by (client side) each client is
remembered, so ``payload_spec(cid, shared)`` keeps its signature.

Broadcasts without the State (FedKSeed, FedBPT). A server part with ``sends_state = False``
gets instructions with an empty ``state``: only its broadcast groups travel, shaped as its
``broadcast_reference(cid, shared)`` declares (else each group is shaped like the State),
and the client rebuilds its State from what it holds (its store, the base model) plus the
broadcast. Such a learner finds the base trainable State in ``ctx.extras["base_state"]``:
the template this end's ``down_reference`` was given (the workbench's), which every end
computes from the same base model. A server part may also add exchange phases of its own
(``phases()``, ``core.protocols.ExchangePhase``), e.g. FedKSeed's history sync, whose
messages need not be shaped like anything declared in advance.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence

from fedfm.aggregators import Pipeline, aggregators, build_server_part, server_optimizers
from fedfm.aggregators.holders import HELD_BACK
from fedfm.aggregators.robust_checks import fewest_updates
from fedfm.aggregators.server_part import ServerPart, ServerPartBase
from fedfm.core.exchanges import build_phases, check_phases
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ClientSpec, Instruction, ServerState, State, Update
from fedfm.learners import build_learner
from fedfm.runtime.roles import assign_roles
from fedfm.runtime.sampling import clients_per_round

OPT_PREFIX = "opt."


class FedAlgorithm:
    def __init__(
        self,
        learner,
        rule,
        rule_params,
        optimizer,
        optimizer_params,
        server_part: ServerPart | None = None,
        pipeline: Pipeline | None = None,
        local_patterns: Sequence[str] = (),
        phases: Sequence = (),
        profiles: dict[int, dict[str, Any]] | None = None,
        seed: int = 0,
        fewest_updates: int = 1,
        fewest_reason: str = "",
    ):
        self.learner = learner
        self.rule, self.rule_params = rule, rule_params
        self.optimizer, self.optimizer_params = optimizer, optimizer_params
        self.server = server_part if server_part is not None else ServerPartBase()
        self.pipeline = pipeline or Pipeline([])
        self.local_patterns = tuple(local_patterns)
        self.phases = list(phases)  # extra exchange phases of every round (core/exchanges.py)
        self.profiles = dict(profiles or {})  # cid -> ClientSpec.profile (runtime/roles.py)
        self.seed = seed
        # the fewest updates the rule (aggregators/robust_checks.fewest_updates) or the server
        # part combines: fewer, after the ``updates``-stage steps, aggregate nothing (the round
        # loop retries or skips the round, and says why with ``fewest_reason``)
        self.fewest_updates = fewest_updates
        self.fewest_reason = fewest_reason or f"the {fewest_updates} updates the aggregator needs"
        self.issued: dict[int, Instruction] = {}  # last instruction per client (per-client shapes)
        self.base: State | None = None  # the base trainable State, for learners sent no State

    def phases_at(self, when: str) -> list:
        return [p for p in self.phases if p.when == when]

    def phase(self, name: str):
        for p in self.phases:
            if p.name == name:
                return p
        raise ValueError(f"unknown exchange phase '{name}' (this run has {[p.name for p in self.phases] or 'none'})")

    def bind_model(self, model) -> None:
        """Give the server part the tuned model its State belongs to (once per process that
        holds one; ``ServerPart.bind_model``)."""
        if self.server.bind_model is not None:
            self.server.bind_model(model)

    @property
    def sends_state(self) -> bool:
        """False when the server half sends only its broadcast groups (no State)."""
        return self.server.sends_state

    # -- shared and local names ----------------------------------------------------------

    def is_local(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.local_patterns)

    def split(self, state: State) -> tuple[State, State]:
        """(shared, local) parts of a full trainable State."""
        shared = {k: v for k, v in state.items() if not self.is_local(k)}
        return shared, {k: v for k, v in state.items() if k not in shared}

    # -- the server side -------------------------------------------------------------------

    def shared_part(self, initial: State) -> State:
        """The shared part of the initial trainable State; refused when it is empty."""
        if not initial:
            raise ValueError("the tuner (peft.method) leaves no parameter trainable: nothing to train or share")
        unmatched = [p for p in self.local_patterns if not any(fnmatch.fnmatchcase(n, p) for n in initial)]
        if unmatched:  # what the user meant to keep on the client would travel and be averaged
            raise ValueError(f"peft.local: {unmatched} match no trainable parameter (e.g. {list(initial)[:2]})")
        shared, _ = self.split(initial)
        if not shared:
            raise ValueError(f"peft.local {list(self.local_patterns)} matches every trainable parameter: nothing is shared")
        return shared

    def init(self, initial: State) -> ServerState:
        shared = self.shared_part(initial)
        state: ServerState = {MODEL: {k: v.detach().clone() for k, v in shared.items()}}
        state.update(self.server.init(state[MODEL]))
        return state

    def model_state(self, server_state: ServerState) -> State:
        """The model the server evaluates and saves: the stored State, or the server half's
        view of it (``model_view``, e.g. PruneFL's State times its masks)."""
        view = self.server.model_view
        return server_state[MODEL] if view is None else view(server_state)

    def configure(self, rnd: int, server_state: ServerState, clients: Sequence[ClientSpec]) -> dict[int, Instruction]:
        per_client = self.server.instruction
        if per_client is not None:
            out = {c.cid: per_client(rnd, server_state, c, self.seed) for c in clients}
            self.issued = dict(out)  # the server checks this attempt's replies only
            return out
        groups = self.server.broadcast(server_state)
        state = server_state[MODEL] if self.sends_state else {}
        out = {c.cid: Instruction(round=rnd, cid=c.cid, state=state, broadcast=dict(groups)) for c in clients}
        return self.pipeline.per_client(out, server_state)  # steps' per-client States (ip/copies.py)

    def payload_spec(self, cid: int, shared: State) -> State:
        """Names, shapes and dtypes the server accepts from client ``cid``, given the
        shared State (the server's global one, or the client's decoded broadcast)."""
        per_client = self.server.client_payload_spec
        if per_client is not None:
            if cid not in self.issued:
                raise ValueError(f"client {cid}: no instruction was issued to it, so its payload shapes are unknown")
            return per_client(self.issued[cid], shared)
        return self.server.payload_spec(shared)

    def down_reference(self, cid: int, template: State, config: dict | None = None) -> State:
        """What client ``cid`` receives: the shared State (unless the server half sends none)
        and each broadcast group (entries ``<group>/<name>``, shaped as the server half's
        ``broadcast_reference`` declares, else like the State's), computed alike on both ends;
        ``config``: the plain settings of the instruction it comes with (None outside a round)."""
        self.base = template
        shared, _ = self.split(template)
        per_client = self.server.client_reference
        if per_client is not None:
            shared = per_client(cid, self.profiles.get(cid, {}), shared, config)
        ref = dict(shared) if self.sends_state else {}
        own = self.server.broadcast_reference
        if own is not None:
            ref.update({f"{g}/{k}": v for g, tensors in own(cid, shared).items() for k, v in tensors.items()})
            return ref
        for group in self.server.broadcast_groups:
            ref.update({f"{group}/{k}": v for k, v in shared.items()})
        return ref

    def aggregate(self, server_state: ServerState, updates: Sequence[Update], ctx: RoundContext) -> tuple[ServerState, dict[str, Any]]:
        new: ServerState = dict(server_state)
        metrics: dict[str, Any] = {}
        kept = self.pipeline.run("updates", list(updates), new, ctx, metrics)
        metrics["kept"] = [u.cid for u in kept]  # the round loop settles the others as not accepted
        if len(kept) < max(1, self.fewest_updates):
            metrics["aggregated"] = 0
            return new, metrics
        model = new[MODEL]
        hetero = self.server.combine_updates
        if hetero is not None:
            groups, delta = hetero(new, kept, self.rule, self.rule_params, ctx)
            new.update(groups)
            if ctx is not None and ctx.notes.get(HELD_BACK):  # groups too few holders left unmoved
                metrics[HELD_BACK] = dict(sorted(ctx.notes[HELD_BACK].items()))
        else:
            deltas = [{k: u.payload[k] for k in model} for u in kept]
            delta = self.rule(model, deltas, [float(u.num_examples) for u in kept], self.rule_params)
            groups, delta = self.server.combine(new, [u.payload for u in kept], delta, ctx)
            new.update(groups)
        delta = self.pipeline.run("delta", delta, new, ctx, metrics)
        moments = {g[len(OPT_PREFIX):]: s for g, s in new.items() if g.startswith(OPT_PREFIX)}
        model, moments = self.optimizer(model, delta, moments, self.optimizer_params)
        new.update({OPT_PREFIX + slot: m for slot, m in moments.items()})
        new[MODEL] = self.pipeline.run("model", model, new, ctx, metrics)
        if self.server.report is not None:
            metrics.update(self.server.report(new))
        metrics["aggregated"] = len(kept)
        return new, metrics

    # -- the client side -------------------------------------------------------------------

    def local_update(self, instruction: Instruction, ctx) -> Update:
        self.issued = {instruction.cid: instruction}  # the client function asks its payload_spec next
        if not self.sends_state and self.base is not None:
            ctx.extras.setdefault("base_state", self.base)
        return self.learner.local_update(instruction, ctx)


def build_algorithm(exp) -> FedAlgorithm:
    """The algorithm of an experiment (its components validated by ``config``)."""
    from fedfm.learners import learners

    learner_params_model = learners.parse(exp.learner.name, exp.learner.params(), "learner")
    spec, so = exp.aggregator, exp.server_optimizer
    server_part = build_server_part(exp.learner.name, learner_params_model, exp.federation.clients)
    fewest, reason = fewest_combined(exp, server_part)
    own_phases = check_phases(server_part.phases(), f"learner '{exp.learner.name}' (its server part's phases)")
    return FedAlgorithm(
        learner=build_learner(exp.learner),
        rule=aggregators.get(spec.rule).obj,
        rule_params=aggregators.parse(spec.rule, spec.params(), "aggregator"),
        optimizer=server_optimizers.get(so.name).obj,
        optimizer_params=server_optimizers.parse(so.name, so.params(), "server_optimizer"),
        server_part=server_part,
        pipeline=Pipeline.from_specs(exp.server_steps),
        local_patterns=exp.peft.local,
        phases=[*build_phases(exp.exchanges), *own_phases],
        profiles=client_profiles(exp),
        seed=exp.seed,
        fewest_updates=fewest,
        fewest_reason=reason,
    )


def fewest_combined(exp, server_part: ServerPart) -> tuple[int, str]:
    """The fewest updates a round aggregates, for the rule and the server part (FedBPT's
    server ES recombines all the clients a round samples), and the reason the loop gives
    for a round below it."""
    spec = exp.aggregator
    rule_min = fewest_updates(spec.rule, spec.params(), exp.federation.clients)
    sampled = clients_per_round(exp.federation, exp.federation.clients)
    part_min = server_part.fewest_updates(sampled)
    if part_min > rule_min:
        return part_min, f"the {part_min} updates the server part of learner {exp.learner.name} combines ({sampled} sampled a round)"
    return rule_min, f"the {rule_min} updates aggregator {spec.rule} needs"


def client_profiles(exp) -> dict[int, dict[str, Any]]:
    """Every client's profile, as ``runtime/roles.apply_profiles`` fills ``ClientSpec.profile``."""
    by_name = {r.name: r for r in exp.federation.roles}
    assignment = assign_roles(exp.federation.roles, exp.federation.clients, exp.seed)
    return {c: {**(dict(by_name[n].profile) if n in by_name else {}), "role": n} for c, n in assignment.items()}
