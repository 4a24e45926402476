"""The one base model in memory, the task, and the encoded data of every client.

However many clients a federation has, a process builds the model exactly once; each
sampled client's State is swapped into it, trained, and read back out.
"""

from __future__ import annotations

from typing import Callable

import torch

from fedfm.core.state import fingerprint
from fedfm.core.types import State
from fedfm.data import Federation, build_federation, load_source
from fedfm.learners.base import LocalContext
from fedfm.peft import apply_tuner, get_state, set_state
from fedfm.runtime.seeding import derive_seed
from fedfm.tasks import build_task


class Workbench:
    def __init__(self, exp, federation: Federation | None = None):
        self.exp = exp
        # Data first: a bad partition fails before the (slow) model load.
        self.federation = federation or build_federation(load_source(exp.data), exp.federation, exp.seed)
        self.task = build_task(exp.model.task)
        model, self.tokenizer = self.task.build(exp.model, exp.seed)
        torch.manual_seed(derive_seed(exp.seed, 0xADA))
        self.model = apply_tuner(model, exp.peft, exp.model.task)
        self.model.eval()
        self.fingerprint = fingerprint(self.model)
        self._examples = self._encode()
        self._eval_batches: list[dict[str, torch.Tensor]] | None = None

    def _encode(self) -> dict[int, dict]:
        fed = self.federation
        rows = sorted({i for c in fed.clients for i in c.indices} | set(fed.test_indices.tolist()))
        frame = fed.frame.iloc[rows]
        encoded = self.task.encode(frame, self.tokenizer, self.exp.data.max_length)
        return dict(zip(rows, encoded))

    @property
    def clients(self):
        return self.federation.clients

    def initial_state(self) -> State:
        return get_state(self.model)

    def examples(self, cid: int) -> list[dict]:
        return [self._examples[i] for i in self.federation.clients[cid].indices]

    def context(self, cid: int, rnd: int, on_step: Callable[[int, int], None] | None = None, store=None) -> LocalContext:
        return LocalContext(
            cid=cid,
            model=self.model,
            task=self.task,
            tokenizer=self.tokenizer,
            examples=self.examples(cid),
            train=self.exp.train,
            seed=derive_seed(self.exp.seed, rnd, cid),
            store=store,
            on_step=on_step,
        )

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """Test batches, sorted by length so padding is minimal; built once and reused."""
        if self._eval_batches is None:
            items = [self._examples[i] for i in self.federation.test_indices.tolist()]
            items.sort(key=lambda e: len(e["input_ids"]))
            bs = self.exp.eval.batch_size
            self._eval_batches = [
                self.task.collate(items[i : i + bs], self.tokenizer) for i in range(0, len(items), bs)
            ]
        return self._eval_batches

    def evaluate(self, state: State) -> dict[str, float]:
        set_state(self.model, state)
        self.model.eval()
        return self.task.evaluate(self.model, self.eval_batches())
