"""The server half of a pruned model (PruneFL, FLASH): what both keep and show.

``MaskedServer`` holds the masks of the prunable weights (``learner.prune``,
``peft/pruning.prunable``) in the server-state group ``GROUP`` (packed bits,
checkpointed), declares their shapes for the decoder (``broadcast_reference``), gives the
model the server evaluates and saves as the State times its masks (``model_view``: a
server step on the delta, e.g. central DP noise, adds to pruned entries too; they act
nowhere, and the next round's delta zeroes them again) and reports ``<prefix>.density``
and ``<prefix>.kept`` after each round: the masks the next round trains. A subclass sets
``GROUP`` and ``PREFIX`` and writes how the masks start and change.
"""

from __future__ import annotations

import torch

from fedfm.aggregators.server_part import ServerPartBase
from fedfm.core.types import MODEL, ServerState, State
from fedfm.peft.pruning import masked_view, packed_like, prunable, report, unpack_mask


class MaskedServer(ServerPartBase):
    GROUP = ""
    PREFIX = ""

    def __init__(self, params, num_clients: int):
        self.params = params

    def names(self, shared: State) -> list[str]:
        found = prunable(shared, self.params.prune)
        if not found:
            two_d = [n for n, t in shared.items() if t.dim() == 2][:4]
            raise ValueError(f"learner.prune {self.params.prune} matches no 2-D weight of the shared State outside the "
                             f"task heads (2-D weights: {two_d}{'...' if len(two_d) == 4 else ''})")
        return found

    def masks(self, server_state: ServerState) -> dict[str, torch.Tensor]:
        model = server_state[MODEL]
        return {n: unpack_mask(bits, model[n]) for n, bits in server_state[self.GROUP].items()}

    def broadcast_reference(self, cid: int, shared: State) -> dict[str, State]:
        return {self.GROUP: packed_like(shared, self.names(shared))}

    def model_view(self, server_state: ServerState) -> State:
        return masked_view(server_state[MODEL], self.masks(server_state))

    def report(self, server_state: ServerState) -> dict:
        return report(self.PREFIX, self.masks(server_state))
