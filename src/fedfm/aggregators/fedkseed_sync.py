"""FedKSeed's downlink: the client is sent only the coefficient history it has not seen
(Qin et al. 2024, "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes", Algorithm 1: a client brings its model up to date
by replaying the (seed, scalar) updates since it last took part, never by downloading it).

The server half (``aggregators/fedkseed.py``) sends no State (``sends_state = False``);
instead two exchange phases run before training (``core.protocols.ExchangePhase``; they are
added to every round by the server half, no ``exchanges:`` entry is needed):

1. ``fedkseed_known``: the server sends an empty message; the client answers with
   ``rows`` int64 (1,), the number of history rows its cached model already includes
   (0 without a cache: ``cache: false``, a fresh client, or a cache the server cannot
   continue, e.g. longer than its history).
2. ``fedkseed_history``: the server sends the history rows ``[rows:]`` sparse: their
   nonzero entries as ``index`` int32 (flat position ``row * K + seed``) and ``coef``
   float32, with meta ``since`` and ``rows`` (a round's row has at most steps x clients
   nonzeros, so 8 B each instead of K x 4 B a row); the client rebuilds the dense rows
   (exactly: the zeros are skipped by the replay anyway) and replays them
   (``aggregators/zo_replay.replay``) onto its cached model, or onto the base State when
   ``since`` is 0, and stages the result in its client store (``fedkseed_model``, with
   ``fedkseed_round`` = {round, rows}); the learner trains from it. With
   ``seed_sampling: score`` (FedKSeed-Pro) the message also carries ``draw`` int32
   (steps,), the seed indices the server drew for the client this round, kept as
   ``fedkseed_round``'s ``seeds``. The store's writes
   count only if the server accepts the client's update, so the cached model and its row
   count always match what the server believes.

Every client rebuilds the server's model bit for bit (the replay repeats the server's
operations; on x86 CPUs of any SIMD level, ``aggregators/zo_replay.py`` says what is and is
not guaranteed), so a fresh client receives the whole history and an up-to-date one only the
rows since.

Memory: the replay runs in the client model's own trainable tensors (``model_tensors``:
the base State or the cached model is copied into them, one tensor at a time from the
store), and the learner reads the stored result back into them the same way
(``ClientStore.read_into``), so a full-parameter client never holds a second copy of the
State beside the model (and the workbench's template); the replay adds one parameter's
direction sum and one direction tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from fedfm.aggregators.fedkseed_pro import draw_seeds, seed_probabilities
from fedfm.aggregators.zo_replay import replay, seed_pool
from fedfm.core.protocols import ExchangePhaseBase
from fedfm.core.types import State

GROUP = "fedkseed.history"  # the server-state group holding ``coef`` (rounds, K)
KNOWN = "fedkseed.known"  # round_state entry: {cid: rows the client's cache includes}
MODEL_KEY = "fedkseed_model"
ROUND_KEY = "fedkseed_round"


def cached_rows(store, cid: int) -> int:
    """History rows included in the client's committed cached model (0 if none)."""
    tag = store.get(cid, ROUND_KEY) if store is not None else None
    return int(tag["rows"].reshape(-1)[0]) if tag is not None and MODEL_KEY in store.keys(cid) else 0


class _Phase(ExchangePhaseBase):
    when = "before_train"

    def __init__(self, params):
        self.params = params


class KnownRows(_Phase):
    name = "fedkseed_known"

    def messages(self, rnd: int, participants: list[int], round_state: dict) -> dict[int, tuple[dict[str, str], State]]:
        return {cid: ({}, {}) for cid in participants}

    def client(self, env: Any, cid: int, rnd: int, meta: dict[str, str], tensors: State) -> tuple[dict[str, str], State]:
        rows = cached_rows(env.store, cid) if self.params.cache else 0
        return {}, {"rows": torch.tensor([rows], dtype=torch.int64)}

    def receive(self, rnd: int, replies: dict[int, tuple[dict[str, str], State]], round_state: dict) -> list[int]:
        history = round_state["server_state"][GROUP]["coef"]
        known = round_state.setdefault(KNOWN, {})
        for cid, (_, tensors) in replies.items():
            rows = tensors.get("rows")
            n = int(rows.reshape(-1)[0]) if rows is not None and rows.numel() == 1 else -1
            known[cid] = n if 0 <= n <= history.shape[0] else 0  # a cache the server cannot continue: from the base
        return sorted(replies)


class HistoryRows(_Phase):
    name = "fedkseed_history"

    def __init__(self, params):
        super().__init__(params)
        self.pool = seed_pool(params.pool_seed, params.num_seeds)

    def messages(self, rnd: int, participants: list[int], round_state: dict) -> dict[int, tuple[dict[str, str], State]]:
        group = round_state["server_state"][GROUP]
        history, known = group["coef"], round_state.get(KNOWN, {})
        out = {cid: sparse_rows(history[known.get(cid, 0):], known.get(cid, 0)) for cid in participants}
        if self.params.seed_sampling == "score":  # FedKSeed-Pro: the server draws each client's seeds
            probs, seed = seed_probabilities(group), run_seed(round_state)
            for cid in participants:
                draw = draw_seeds(probs, self.params.steps, seed, self.params.pool_seed, rnd, cid).to(torch.int32)
                out[cid] = (out[cid][0], {**out[cid][1], "draw": draw})
        return out

    def client(self, env: Any, cid: int, rnd: int, meta: dict[str, str], tensors: State) -> tuple[dict[str, str], State]:
        since, rows = int(meta["since"]), dense_rows(meta, tensors, self.params.num_seeds, cid)
        if since > 0:
            if cached_rows(env.store, cid) != since:
                raise ValueError(f"fedkseed: client {cid} was sent the history from row {since}, but its cache holds "
                                 f"{cached_rows(env.store, cid)} rows")
        base = env.algo.split(env.wb.template)[0]
        start = model_tensors(env.wb.model, base)  # the model's own tensors: no second copy of the State
        if since > 0:
            if start is None:
                start = env.store.get(cid, MODEL_KEY)  # freshly loaded: replayed in place
            else:
                env.store.read_into(cid, MODEL_KEY, start)
        elif start is None:
            start = {k: v.clone() for k, v in base.items()}
        else:
            with torch.no_grad():
                for k, v in base.items():
                    start[k].copy_(v)
        model = replay(start, rows.to(torch.float32), self.pool, in_place=True)
        env.store.put(cid, MODEL_KEY, model)
        tag = {"round": torch.tensor([rnd]), "rows": torch.tensor([since + rows.shape[0]])}
        if "draw" in tensors:  # seed_sampling: score, the seeds the server drew for this round
            tag["seeds"] = tensors["draw"].to(torch.int64).reshape(-1)
        env.store.put(cid, ROUND_KEY, tag)
        return {}, {}


def run_seed(round_state: dict) -> int:
    """The run's ``seed``, from the server's workbench in the round state."""
    wb = round_state.get("workbench")
    if wb is None:
        raise ValueError("fedkseed: seed_sampling score draws each client's seeds from the run seed; the round state "
                         "has no workbench to read it from")
    return int(wb.exp.seed)


def model_tensors(model: Any, base: State) -> State | None:
    """The tensors of ``model``'s trainable parameters named as in ``base`` (the shared
    trainable State), when they can hold the replay exactly (float32 on the CPU, the same
    names and shapes); None otherwise. The model is the client's scratch space: every
    learner loads its State before training, so rebuilding into it costs no extra copy."""
    if model is None:
        return None
    params = {n: p.data for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(base) or any(
        t.dtype != torch.float32 or t.device.type != "cpu" or tuple(t.shape) != tuple(base[n].shape) for n, t in params.items()
    ):
        return None
    return params


def sparse_rows(rows: torch.Tensor, since: int) -> tuple[dict[str, str], State]:
    """(meta, tensors) of history rows: their nonzero entries, flat index int32 and value."""
    flat = rows.reshape(-1)
    index = torch.nonzero(flat).flatten()
    return {"since": str(since), "rows": str(rows.shape[0])}, {"index": index.to(torch.int32), "coef": flat[index].to(torch.float32)}


def dense_rows(meta: dict[str, str], tensors: State, num_seeds: int, cid: int) -> torch.Tensor:
    """The inverse of ``sparse_rows``: (rows, K) float32, checked."""
    n, index, coef = int(meta["rows"]), tensors["index"].to(torch.int64).reshape(-1), tensors["coef"].reshape(-1)
    if index.numel() != coef.numel() or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= n * num_seeds)):
        raise ValueError(f"fedkseed: client {cid} got a sparse history that does not fit {n} rows of {num_seeds} seeds")
    dense = torch.zeros(n * num_seeds, dtype=torch.float32)
    dense[index] = coef.to(torch.float32)
    return dense.view(n, num_seeds)


def sync_phases(params) -> list:
    return [KnownRows(params), HistoryRows(params)]
