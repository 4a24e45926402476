"""The contracts between the round loop and everything that plugs into it.

Only types and Protocols live here; implementations are in their rooms:

- ``Algorithm`` (composed in ``runtime/algorithm.py``): what the server keeps, what each
  client is asked and may send back, how the server combines what came back.
- ``ServerStep`` (``aggregators/pipeline.py``): a composable step around the aggregation
  rule, at one of three stages: on the decoded ``updates`` before the rule (clipping,
  attack simulation), on the combined ``delta`` after it (noise), or on the new ``model``
  after the server optimizer (watermark embedding). A step may keep tensors in the server
  state (checkpointed) and report metrics.
- ``ClientMiddleware`` (``runtime/middleware.py``): what a client does to its examples
  before training and to its update after training (attacks, local noise), run by the one
  client function on every transport.
- ``Transport`` (``runtime/transport.py``, ``runtime/flower/transport.py``): carries
  ``Envelope`` bytes to clients and ``Reply`` bytes back, and nothing else: faults,
  retries, validation, byte counting and checkpoints belong to the round loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, Sequence

import torch

from fedfm.core.types import ClientSpec, Instruction, ServerState, State, Update

Stage = Literal["updates", "delta", "model"]
TRAIN = "train"
EVALUATE = "evaluate"
SETTLE = "settle"  # the end of a run: each client settles its last staged writes (no payload)


@dataclass
class RoundContext:
    """What the server side of one round may use.

    ``generator`` is seeded from (seed, round), never from a global stream, so a resumed
    run draws the same numbers. ``workbench`` gives server-side steps the one base model
    (``model``, ``task``, ``tokenizer``, ``evaluate``); it is None where a step needs none.
    ``notes`` is what one server step tells a later step of the same round (``dp_clip``
    tells ``dp_noise`` its clip norm and count); a fresh context per aggregation, so notes
    never leak into another round. ``rounds`` and ``sample_size`` are the run's plan (its
    number of rounds, the clients it samples per round): what a privacy accountant needs,
    0 where no run gives them. ``model`` is the model State the round started from (what
    the server evaluates; read only), for steps that score updates against it (``fedfa``'s
    Fisher); None where no run gives it.
    """

    round: int
    seed: int
    generator: torch.Generator
    num_clients: int
    clients: Sequence[ClientSpec] = ()
    workbench: Any = None
    attempt: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    rounds: int = 0
    sample_size: int = 0
    model: State | None = None


class Algorithm(Protocol):
    def init(self, initial: State) -> ServerState: ...

    def configure(self, rnd: int, server_state: ServerState, clients: Sequence[ClientSpec]) -> dict[int, Instruction]: ...

    def payload_spec(self, cid: int, shared: State) -> State: ...

    def down_reference(self, cid: int, template: State) -> State: ...

    def local_update(self, instruction: Instruction, ctx: Any) -> Update: ...

    def aggregate(self, server_state: ServerState, updates: Sequence[Update], ctx: RoundContext) -> tuple[ServerState, dict[str, Any]]: ...

    def model_state(self, server_state: ServerState) -> State: ...


class ExchangePhase(Protocol):
    """One extra message exchange of a round, before or after the train phase (secure
    aggregation's key advertisement, share exchange and unmasking; split learning's steps).

    The loop sends each participant ``messages(...)[cid]`` (plain ``meta`` strings and
    tensors, serialized with safetensors and counted in ``bytes_down``), delivers them to
    ``client(...)`` on the client, counts the replies in ``bytes_up`` and hands them to
    ``receive``, which returns the clients that go on (a client that does not answer, or
    whose reply ``receive`` refuses, is recorded as failed in that phase). ``round_state``
    is one dict shared by the phases of one round attempt: what ``receive`` learned,
    ``round_state["instructions"][cid]`` (plain settings merged into that client's train
    instruction), ``round_state["attempt"]``, and the server's context for phases that
    compute on the server (SplitFed's main server): ``round_state["server_state"]`` (the
    ``ServerState`` the round started from, not to be mutated) and
    ``round_state["workbench"]`` (the server's base model). A phase after training may replace the accepted updates
    (``transform``), e.g. by their unmasked sum.

    Two hooks, None where a phase does not use them (``ExchangePhaseBase`` declares both
    None): ``on_train_reply(env, cid, rnd, update, ctx) -> Update``, which the client
    function calls, for every phase that has it and in phase order, on the client's update
    after its middleware and before encoding (secure aggregation masks the update there, so
    that no role or middleware has to ask for it); ``metrics(round_state) -> dict``: what
    the phase reports into the round's row of metrics.jsonl as ``<phase name>.<key>``, read
    after its ``receive`` (and ``transform``), e.g. why secure aggregation failed.
    """

    name: str
    when: Literal["before_train", "after_train"]
    on_train_reply: Callable[[Any, int, int, Update, Any], Update] | None
    metrics: Callable[[dict], dict[str, Any]] | None

    def messages(self, rnd: int, participants: list[int], round_state: dict) -> dict[int, tuple[dict[str, str], State]]: ...

    def client(self, env: Any, cid: int, rnd: int, meta: dict[str, str], tensors: State) -> tuple[dict[str, str], State]: ...

    def receive(self, rnd: int, replies: dict[int, tuple[dict[str, str], State]], round_state: dict) -> list[int]: ...

    def transform(self, updates: list[Update], round_state: dict) -> list[Update]: ...


class ExchangePhaseBase:
    """``ExchangePhase``'s hooks declared unused, every reply accepted (``receive``) and the
    updates left as they are (``transform``); a phase derives from it and writes the rest."""

    on_train_reply = None
    metrics = None

    def receive(self, rnd: int, replies: dict[int, tuple[dict[str, str], State]], round_state: dict) -> list[int]:
        return sorted(replies)

    def transform(self, updates: list[Update], round_state: dict) -> list[Update]:
        return updates


PHASE_MEMBERS = ("name", "when", "messages", "client", "receive", "transform", "on_train_reply", "metrics")


class ServerStep(Protocol):
    """``client_state(cid, model, own_group) -> State``, or None: the State this client is
    sent instead of the global model (per-client watermarked copies, ``ip/copies.py``);
    ``Pipeline.per_client`` applies it in config order when the round is configured."""

    name: str
    stage: Stage
    client_state: Callable[[int, State, State], State] | None

    def __call__(self, value: Any, ctx: RoundContext, state: State) -> tuple[Any, State, dict[str, Any]]:
        """``value``: the list of updates, the delta State or the model State (by stage);
        ``state``: this step's own tensors from the server state (empty at first).
        Returns (new value, new step state, metrics for metrics.jsonl)."""
        ...


class ClientMiddleware(Protocol):
    name: str

    def before_train(self, examples: list[dict], ctx: Any) -> list[dict]: ...

    def after_train(self, update: Update, ctx: Any) -> Update: ...


@dataclass
class Envelope:
    """One message to one client: plain settings (``conf``) and encoded bytes."""

    cid: int
    phase: str
    conf: dict[str, Any]
    data: bytes


@dataclass
class Reply:
    """One client's answer: its bytes, or the error it raised; ``info`` holds numbers the
    client reports about itself (per-stage codec bytes, its wall time)."""

    cid: int
    data: bytes | None = None
    error: str | None = None
    info: dict[str, float] = field(default_factory=dict)


class Transport(Protocol):
    name: str

    def exchange(self, envelopes: Sequence[Envelope], timeout: float | None = None) -> dict[int, Reply]:
        """Deliver every envelope and return the replies that came back, by client id;
        a client missing from the result did not answer in time."""
        ...

    def close(self) -> None: ...
