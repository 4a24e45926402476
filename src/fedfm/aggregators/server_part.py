"""The server side of a client algorithm that keeps server state (FedDyn, SCAFFOLD).

A server part is found by the learner's YAML name (``register_server_part``), so the
learner (client side, ``learners/``) and its server half (here) stay in their rooms. It
owns named groups of the server state, may broadcast tensor groups beside the State (they
travel through the downlink codec chain as ``<group>/<name>`` and are counted), may widen
the payload a client sends, and turns the rule's combined delta into the pseudo-gradient
the server optimizer applies.

Every member of ``ServerPart`` is declared on every part: ``ServerPartBase`` gives each
one the value of a learner without a server half (no groups, the State's own payload, the
rule's delta unchanged, no per-client hooks), so a part writes only what it changes, and
``runtime/algorithm.py`` reads the members directly (a per-client hook is a method or
None). ``build_server_part`` checks a factory's part once and names any member it lacks,
so a part written without the base class fails at the start, not in round 1.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from fedfm.core.protocols import RoundContext
from fedfm.core.registry import Registry
from fedfm.core.types import Instruction, ServerState, State, Update

# the per-client hooks of parts whose clients hold differently shaped States (HetLoRA,
# FlexLoRA, FedRA, SplitFed, update_clusters) or that broadcast groups not shaped like the
# State (FedKSeed, FedBPT): None where a part does not use one
HOOKS = ("instruction", "client_reference", "client_payload_spec", "combine_updates", "broadcast_reference", "model_view", "report",
         "bind_model")
MEMBERS = ("broadcast_groups", "sends_state", "init", "broadcast", "payload_spec", "combine", "phases", "fewest_updates", *HOOKS)


class ServerPart(Protocol):
    broadcast_groups: tuple[str, ...]  # names of the tensor groups sent beside the State
    sends_state: bool  # False: only the broadcast groups travel down (FedKSeed, FedBPT)

    def init(self, model: State) -> ServerState:
        """This part's groups; a part may also return ``MODEL``, the model it starts from
        (PruneFL, FLASH: the initial State pruned by their first masks)."""
        ...

    def broadcast(self, server_state: ServerState) -> dict[str, State]: ...

    def payload_spec(self, shared: State) -> State: ...

    def combine(
        self, server_state: ServerState, payloads: Sequence[State], mean_delta: State, ctx: RoundContext
    ) -> tuple[ServerState, State]:
        """(server state, raw payloads, the rule's combined delta) -> (this part's updated
        groups, the pseudo-gradient for the server optimizer)."""
        ...

    def phases(self) -> list:
        """Exchange phases this part adds to every round (``core.protocols.ExchangePhase``)."""
        ...

    def fewest_updates(self, sample_size: int) -> int:
        """The fewest updates this part combines when a round samples ``sample_size``
        clients (FedBPT: all of them); the round loop retries or skips a round with fewer,
        as it does below the aggregator rule's minimum."""
        ...

    # Per-client hooks (None when unused), with these signatures:
    # instruction(rnd, server_state, client, seed) -> Instruction: one client's own State
    #     (e.g. truncated to its rank) and config
    # client_reference(cid, profile, shared, config) -> State: the names and shapes client
    #     cid receives (both ends compute it; ``config``: the plain settings of the
    #     instruction it is sent with, as they travel, or None outside a round, e.g.
    #     ``fedfm check``: FedRA's allocated layers)
    # client_payload_spec(instruction, shared) -> State: what the client may send back,
    #     given the instruction it was issued
    # combine_updates(server_state, updates, rule, rule_params, ctx) -> (groups, delta):
    #     replaces "deltas over the global names -> rule -> combine"
    # broadcast_reference(cid, shared) -> {group: State}: the broadcast groups' shapes when
    #     they are not the State's
    # model_view(server_state) -> State: the model the server evaluates and saves, when it
    #     is not the State as stored (PruneFL: the State times its masks)
    # report(server_state) -> dict: numbers about the new server state for the round's row
    #     of metrics.jsonl, after aggregation (PruneFL: the density of the masks)
    # bind_model(model) -> None: the tuned model the State belongs to, given once by each
    #     process that holds one (server, client, ``fedfm check``'s meta-device skeleton)
    #     before any other hook runs there (SplitFed: the model's layer count, frozen layers
    #     included, which the trainable State's names cannot tell)
    instruction: Callable[[int, ServerState, object, int], Instruction] | None
    client_reference: Callable[[int, dict, State, dict | None], State] | None
    client_payload_spec: Callable[[Instruction, State], State] | None
    combine_updates: Callable[[ServerState, Sequence[Update], Callable, object, RoundContext], tuple[ServerState, State]] | None
    broadcast_reference: Callable[[int, State], dict[str, State]] | None
    model_view: Callable[[ServerState], State] | None
    report: Callable[[ServerState], dict] | None
    bind_model: Callable[[object], None] | None


class ServerPartBase:
    """Every ``ServerPart`` member at the value of a learner with no server half; a part
    derives from it and writes what it changes (the runtime uses it as is for learners that
    register none)."""

    broadcast_groups: tuple[str, ...] = ()
    sends_state: bool = True
    instruction = None
    client_reference = None
    client_payload_spec = None
    combine_updates = None
    broadcast_reference = None
    model_view = None
    report = None
    bind_model = None

    def init(self, model: State) -> ServerState:
        return {}

    def broadcast(self, server_state: ServerState) -> dict[str, State]:
        return {g: server_state[g] for g in self.broadcast_groups}

    def payload_spec(self, shared: State) -> State:
        return shared

    def combine(self, server_state: ServerState, payloads: Sequence[State], mean_delta: State,
                ctx: RoundContext) -> tuple[ServerState, State]:
        return {}, mean_delta

    def phases(self) -> list:
        return []

    def fewest_updates(self, sample_size: int) -> int:
        return 1


ServerPartFactory = Callable[[object, int], ServerPart]  # (learner params, number of clients)
server_parts: Registry[ServerPartFactory] = Registry("learner.name (server part)")


def register_server_part(learner_name: str, factory: ServerPartFactory) -> ServerPartFactory:
    return server_parts.register(learner_name, factory)


def missing_members(part: object) -> list[str]:
    """The ``ServerPart`` members ``part`` does not declare (empty: a complete part)."""
    return [m for m in MEMBERS if not hasattr(part, m)]


def build_server_part(learner_name: str, params, num_clients: int) -> ServerPart:
    """The server half registered under ``learner_name``, or a ``ServerPartBase`` (none)."""
    if learner_name not in server_parts.names():
        return ServerPartBase()
    part = server_parts.get(learner_name).obj(params, num_clients)
    missing = missing_members(part)
    if missing:
        raise TypeError(f"the server part of learner '{learner_name}' ({type(part).__name__}) lacks {missing}: "
                        "derive it from fedfm.aggregators.ServerPartBase, or declare them (None for an unused hook)")
    return part


def issues_instructions(learner_name: str) -> bool:
    """Whether the server half of ``learner_name`` builds each client's own Instruction (its
    registered class defines ``instruction``), read without building the part: config checks
    run before the learner's parameters are known to be valid."""
    if learner_name not in server_parts.names():
        return False
    return getattr(server_parts.get(learner_name).obj, "instruction", None) is not None
