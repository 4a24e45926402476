"""FLASH's server half, SPDST and JMWST (Babakniya et al. 2023, "Revisiting Sparsity
Hunting in Federated Learning: Why does Sparsity Consensus Matter?", TMLR): the sparsity
consensus of the discovery round, then one fixed mask (SPDST) or one re-picked from the
aggregate (JMWST).

- ``init``: uniform random masks, ``density`` of every prunable weight (``mask_seed``):
  where the clients' discovery starts (each client prunes the model it receives by them;
  the stored model stays whole, since the fixed masks keep entries these prune and FLASH
  starts the pruned model afresh: the discovery round's downlink is the whole State).
- The discovery round, the first round in which the server aggregates (round 1, unless
  no update of it was aggregated: ``federation.on_too_few: skip``, every client dropped or
  failed; the server-state group ``flash.schedule`` keeps the round that discovered, 0
  before, checkpointed): every sampled client is sent the State and those masks with
  ``discover`` (the client knows its phase from the instruction, never from the round
  number), and sends back the masks its dynamic sparse training ended with
  (``learners/flash.py``). ``combine_updates`` takes each weight's density averaged over
  those masks, scales all of them by one factor so that the whole reaches ``density``
  (each capped at 1; ``peft/pruning.consensus_densities``), and draws the fixed masks at
  those densities, uniformly at random (FLASH's server mask: what is shared is how much of
  each layer to keep, not which entries), or, with ``pick: magnitude``, the entries of
  largest ``|w|`` (how FLASH's JMWST variant picks its server mask's entries, here from
  the pre-trained weights: a random cut of a pre-trained model removes what it learned
  as readily as what it did not). The weights do not move (FLASH discards the
  discovery round's training; here the model stays the pre-trained one), pruned by the
  fixed masks.
- ``variant: jmwst`` (FLASH's joint mask-weight sparse training): in every
  ``update_every``-th round after discovery the clients prune and regrow as in discovery
  and send their delta and masks; the rule combines the deltas (the clients' sparse models
  averaged), the clients' masks give each weight's share (the same consensus), and the new
  mask keeps that share of each weight's largest entries of the aggregate, which is then
  pruned by it (also in the run's last round, so the saved model has the target density).
- Hetero-FLASH: a client whose profile gives it a smaller share
  (``profile.capacity``, or ``profile.density`` itself) is sent, after discovery, the
  State and masks of its level (``aggregators/nested_masks.level_masks``: each weight's
  largest entries of the server's mask, from the current model, as FLASH's server picks a
  mask per density level every round), and each entry is combined over the clients that
  hold it (``nested_combine``). In a JMWST round, where the clients' masks change, each
  entry is averaged over the clients whose final mask keeps it (``holder_average``;
  ``aggregator.rule`` must be ``fedavg``, checked at config time) before the re-pick.
- Later rounds: the rule's delta on the pruned model, with pruned entries zeroed
  (``peft/pruning.zeroing_delta``); masks, model view and ``flash.density`` /
  ``flash.kept``: ``aggregators/masked.py``.

The discovery round costs a round of training whose weights are not kept; its uplink is one
bit per prunable entry per client. FLASH draws each entry of the final mask with
probability ``density``; here exactly ``ceil(density * numel)`` entries of each weight.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.masked import MaskedServer
from fedfm.aggregators.server_part import register_server_part
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ClientSpec, Instruction, ServerState, State, Update
from fedfm.learners.flash import FOUND, GROUP
from fedfm.aggregators.nested_masks import client_share, holder_average, level_masks, nested_combine
from fedfm.peft.pruning import (consensus_densities, magnitude_masks, masked_view, pack_mask, packed_like, random_masks,
                                unpack_mask, zeroing_delta)

DISCOVERY_ROUND = 1  # where the schedule starts; a state without ``SCHEDULE`` discovered in it
SCHEDULE = "flash.schedule"  # {"discovered": int64 (1,)}: the round whose aggregation discovered, 0 before


class FlashServer(MaskedServer):
    GROUP, PREFIX = GROUP, "flash"

    def __init__(self, params, num_clients: int):
        super().__init__(params, num_clients)
        self._levels: dict[float, dict[str, torch.Tensor]] = {}
        self._levels_round = -1

    def init(self, model: State) -> ServerState:
        names = self.names(model)
        masks = random_masks({n: model[n] for n in names}, {n: self.params.density for n in names}, self.params.mask_seed)
        return {GROUP: {n: pack_mask(m) for n, m in masks.items()},  # the stored model stays whole: see above
                SCHEDULE: {"discovered": torch.zeros(1, dtype=torch.int64)}}

    def report(self, server_state: ServerState) -> dict:
        """``flash.density`` and ``flash.kept`` of the next round's masks, and
        ``flash.discovered``: the round that discovered them (0 while none has)."""
        out = super().report(server_state)
        if SCHEDULE in server_state:
            out[f"{self.PREFIX}.discovered"] = int(server_state[SCHEDULE]["discovered"][0])
        return out

    def discovery_round(self, rnd: int, server_state: ServerState) -> int:
        """The round that discovers: the one that did, else ``rnd`` (no round has aggregated yet)."""
        if SCHEDULE not in server_state:
            return DISCOVERY_ROUND
        done = int(server_state[SCHEDULE]["discovered"][0])
        return done if done > 0 else rnd

    def instruction(self, rnd: int, server_state: ServerState, client: ClientSpec, seed: int) -> Instruction:
        discovery = self.discovery_round(rnd, server_state)
        config = {"discover": rnd == discovery, "regrow": self.regrows(rnd, discovery)}
        share = self.share(client.profile, client.cid)
        if share < 1.0 and rnd != discovery:  # Hetero-FLASH: the client's nested sub-mask
            mine = self.level(rnd, server_state, share)
            return Instruction(round=rnd, cid=client.cid, state=masked_view(server_state[MODEL], mine), config=config,
                               broadcast={GROUP: {n: pack_mask(m) for n, m in mine.items()}})
        return Instruction(round=rnd, cid=client.cid, state=server_state[MODEL], config=config,
                           broadcast={GROUP: server_state[GROUP]})

    def share(self, profile: dict, cid: int) -> float:
        """The client's share of the server's mask (``aggregators/nested_masks.client_share``)."""
        return client_share(profile, self.params.density, f"client {cid}")

    def level(self, rnd: int, server_state: ServerState, share: float) -> dict[str, torch.Tensor]:
        """The masks a client at ``share`` trains in round ``rnd`` (one computation per round and share)."""
        if self._levels_round != rnd:
            self._levels, self._levels_round = {}, rnd
        if share not in self._levels:
            self._levels[share] = level_masks(server_state[MODEL], self.masks(server_state), share)
        return self._levels[share]

    def regrows(self, rnd: int, discovery: int = DISCOVERY_ROUND) -> bool:
        """JMWST: whether round ``rnd``'s clients prune and regrow, and the server re-picks,
        after discovery in round ``discovery``."""
        trained = rnd - discovery  # rounds after discovery: 1, 2, ...
        return self.params.variant == "jmwst" and trained >= 1 and trained % self.params.update_every == 0

    def client_payload_spec(self, instruction: Instruction, shared: State) -> State:
        found = {FOUND + n: t for n, t in packed_like(shared, self.names(shared)).items()}
        if instruction.config.get("discover"):
            return found
        return {**shared, **found} if instruction.config.get("regrow") else dict(shared)

    def combine_updates(self, server_state: ServerState, updates: Sequence[Update], rule, rule_params,
                        ctx: RoundContext) -> tuple[ServerState, State]:
        model, masks = server_state[MODEL], self.masks(server_state)
        profiles = {c.cid: c.profile for c in ctx.clients}
        discovery = self.discovery_round(ctx.round, server_state)
        if ctx.round == discovery:  # payloads of masks only
            found = [{n: unpack_mask(u.payload[FOUND + n], model[n]) for n in masks} for u in updates]
            densities = consensus_densities(found, self.params.density)
            if self.params.pick == "magnitude":
                fixed = magnitude_masks(model, list(masks), densities)
            else:
                fixed = random_masks({n: model[n] for n in masks}, densities, self.params.mask_seed + 1)
            zero = {k: torch.zeros_like(v) for k, v in model.items()}  # the weights do not move ...
            groups = {GROUP: {n: pack_mask(m) for n, m in fixed.items()}, SCHEDULE: {"discovered": torch.tensor([ctx.round])}}
            return groups, zeroing_delta(zero, model, fixed, fixed)  # ... but are pruned
        shares = [self.share(profiles.get(u.cid, {}), u.cid) for u in updates]
        regrow = self.regrows(ctx.round, discovery)
        if min(shares) < 1.0 and not regrow:  # Hetero-FLASH: entry by entry over its holders
            delta = nested_combine(model, updates, shares, lambda f: self.level(ctx.round, server_state, f), rule, rule_params,
                                   ctx.notes)
            return {}, zeroing_delta(delta, model, masks, masks)
        hetero = min(shares) < 1.0  # only in a JMWST round here: the masked weights are averaged by holder below
        keys = [k for k in model if not (hetero and k in masks)]
        ruled = {k: model[k] for k in keys}
        delta = rule(ruled, [{k: u.payload[k] for k in keys} for u in updates], [float(u.num_examples) for u in updates],
                     rule_params)
        if not regrow:  # the round's own schedule, as for discovery
            return {}, zeroing_delta(delta, model, masks, masks)
        # JMWST: the clients' masks give each weight's share, the aggregate which entries
        found = [{n: unpack_mask(u.payload[FOUND + n], model[n]) for n in masks} for u in updates]
        if hetero:  # Hetero-FLASH: each entry averaged over the clients whose final mask keeps it
            received = [self.level(ctx.round, server_state, f) for f in shares]
            delta.update(holder_average(model, updates, received, found))
        densities = consensus_densities(found, self.params.density)
        aggregate = {n: model[n] + delta[n].to(model[n].dtype) for n in masks}
        new = magnitude_masks(aggregate, list(masks), densities)
        return {GROUP: {n: pack_mask(m) for n, m in new.items()}}, zeroing_delta(delta, model, new, new)


register_server_part("flash", FlashServer)

__all__ = ["FlashServer"]
