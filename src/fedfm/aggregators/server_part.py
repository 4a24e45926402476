"""The server side of a client algorithm that keeps server state (FedDyn, SCAFFOLD).

A server part is found by the learner's YAML name (``register_server_part``), so the
learner (client side, ``learners/``) and its server half (here) stay in their rooms. It
owns named groups of the server state, may broadcast tensor groups beside the State (they
travel through the downlink codec chain as ``<group>/<name>`` and are counted), may widen
the payload a client sends, and turns the rule's combined delta into the pseudo-gradient
the server optimizer applies.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from fedfm.core.protocols import RoundContext
from fedfm.core.registry import Registry
from fedfm.core.types import ServerState, State


class ServerPart(Protocol):
    broadcast_groups: tuple[str, ...]  # names of the tensor groups sent beside the State

    def init(self, model: State) -> ServerState: ...

    def broadcast(self, server_state: ServerState) -> dict[str, State]: ...

    def payload_spec(self, shared: State) -> State: ...

    def combine(
        self, server_state: ServerState, payloads: Sequence[State], mean_delta: State, ctx: RoundContext
    ) -> tuple[ServerState, State]:
        """(server state, raw payloads, the rule's combined delta) -> (this part's updated
        groups, the pseudo-gradient for the server optimizer)."""
        ...


class HeteroServerPart(ServerPart, Protocol):
    """A server part whose clients hold differently shaped States (HetLoRA, FlexLoRA,
    FedRA). ``runtime/algorithm.py`` uses each hook when the part has it."""

    def instruction(self, rnd: int, server_state: ServerState, client, seed: int):
        """One client's Instruction: its own State (e.g. truncated to its rank) and config."""
        ...

    def client_reference(self, cid: int, profile: dict, shared: State) -> State:
        """The names and shapes client ``cid`` receives (both ends compute it)."""
        ...

    def client_payload_spec(self, instruction, shared: State) -> State:
        """What the client may send back, given the instruction it was issued."""
        ...

    def combine_updates(self, server_state: ServerState, updates: Sequence, rule, rule_params, ctx: RoundContext) -> tuple[ServerState, State]:
        """(this part's updated groups, the delta on the global State) from the round's
        updates; replaces "deltas over the global names -> rule -> combine"."""
        ...


ServerPartFactory = Callable[[object, int], ServerPart]  # (learner params, number of clients)
server_parts: Registry[ServerPartFactory] = Registry("learner.name (server part)")


def register_server_part(learner_name: str, factory: ServerPartFactory) -> ServerPartFactory:
    return server_parts.register(learner_name, factory)


def build_server_part(learner_name: str, params, num_clients: int) -> ServerPart | None:
    if learner_name not in server_parts.names():
        return None
    return server_parts.get(learner_name).obj(params, num_clients)
