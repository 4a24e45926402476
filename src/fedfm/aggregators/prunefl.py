"""PruneFL's server half (Jiang et al. 2023, "Model Pruning Enables Efficient Federated
Learning on Edge Devices", IEEE TNNLS): the masks of the pruned model, and their adaptive
reconfiguration from the clients' squared gradients.

- ``init``: the prunable weights (``learner.prune``, ``peft/pruning.prunable``) and their
  first masks: every entry (``initial_density: 1``), or the largest ``|w|`` of each
  weight; the model is stored pruned by them. The masks are the server-state group
  ``prunefl.mask`` (packed bits), checkpointed with the rest.
- ``instruction``: every sampled client gets the shared State, the masks (counted in
  ``bytes_down``) and ``importance`` in a reconfiguration round (``reconfigure_every``,
  ``reconfigure_until``).
- ``combine``: the rule's delta is kept at entries kept before and after this round and
  replaced by ``-w`` everywhere else, so after the (plain, lr 1) server step every pruned
  entry is exactly zero, whatever lossy codec, robust rule or attack touched it; in a
  reconfiguration round the new masks come first: the clients' squared gradients, averaged
  over the clients that sent them (negative entries, which only an attack makes, count as
  zero), ranked by PruneFL's rule (``peft/pruning.select_kept``) with ``fixed_s`` as ``c``
  and ``per_value_s`` as every entry's ``t_j``. A re-added entry starts at zero. Never in
  the run's last round: no round would train those masks, and the saved model is the one
  trained (``reconfigure_until`` at or past ``rounds`` is refused at config time).
- the model evaluated and saved, the masks' shapes and the round's ``prunefl.density`` /
  ``prunefl.kept``: ``aggregators/masked.py``.

Differences from the paper, said here and in docs/compression.md: PruneFL's initial
pruning runs iterative pruning on one selected client's data; here it is one-shot
magnitude pruning of the pre-trained weights (or none, the default). PruneFL measures
``t_j`` per layer on the device (sparse kernels make a pruned entry cheaper to compute);
here one ``per_value_s`` for every entry, given in the config (CPU matmuls are dense, so a
pruned entry saves its bytes on the wire, not compute). PruneFL reconfigures every fixed
number of iterations; here every ``reconfigure_every`` rounds, from the squared gradients
summed over that round's local steps.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedfm.aggregators.masked import MaskedServer
from fedfm.aggregators.server_part import register_server_part
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, ClientSpec, Instruction, ServerState, State
from fedfm.learners.prunefl import G2, GROUP
from fedfm.peft.pruning import magnitude_masks, masked_view, pack_mask, select_kept, zeroing_delta


class PruneFLServer(MaskedServer):
    GROUP, PREFIX = GROUP, "prunefl"

    def init(self, model: State) -> ServerState:
        masks = magnitude_masks(model, self.names(model), self.params.initial_density)
        return {MODEL: masked_view(model, masks), GROUP: {n: pack_mask(m) for n, m in masks.items()}}

    def instruction(self, rnd: int, server_state: ServerState, client: ClientSpec, seed: int) -> Instruction:
        return Instruction(round=rnd, cid=client.cid, state=server_state[MODEL],
                           config={"importance": self.params.reconfigures(rnd)},
                           broadcast={GROUP: server_state[GROUP]})

    def client_payload_spec(self, instruction: Instruction, shared: State) -> State:
        spec = dict(shared)
        if instruction.config.get("importance"):
            spec.update({G2 + n: torch.zeros_like(shared[n], dtype=torch.float32) for n in self.names(shared)})
        return spec

    def combine(self, server_state: ServerState, payloads: Sequence[State], mean_delta: State,
                ctx: RoundContext) -> tuple[ServerState, State]:
        model, old = server_state[MODEL], self.masks(server_state)
        new, groups = old, {}
        reporting = [p for p in payloads if all(G2 + n in p for n in old)]
        last = ctx.rounds > 0 and ctx.round >= ctx.rounds  # masks no round would train: keep the trained ones
        if reporting and not last:
            scores = {n: torch.stack([p[G2 + n].float().clamp_min(0) for p in reporting]).mean(dim=0) for n in old}
            new = select_kept(scores, self.params.fixed_s, self.params.per_value_s)
            groups = {GROUP: {n: pack_mask(m) for n, m in new.items()}}
        return groups, zeroing_delta(mean_delta, model, old, new)


register_server_part("prunefl", PruneFLServer)

__all__ = ["PruneFLServer"]
