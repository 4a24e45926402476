"""The one base model in memory, the task, and the encoded data of the clients.

However many clients a federation has, a process builds the model exactly once; each
sampled client's State is swapped into it, trained, and read back out. Examples are
tokenized lazily, per client, the first time that client is asked for them (and kept), so
a federation of 1,000 clients costs memory only for the clients that were sampled. A
server-only workbench (``server_only=True``, Flower's SuperLink side) reads the source
once to compute the seeded partition (client sizes, profiles, the test rows), then drops
the text of every client row: it holds and encodes only the test set, and asking it for
a client's examples is an error.

The model lives on ``runtime.device`` (runtime/device.py); evaluation runs under
``torch.inference_mode`` in batches sorted by length (``eval.sort_by_length``).

Client profiles (``federation.roles``) and each client's own held-out slice
(``federation.client_holdout``) are filled in here, identically in every process.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import numpy as np
import torch

from fedfm.core.seeding import derive_seed
from fedfm.core.state import fingerprint
from fedfm.core.types import State
from fedfm.data import Federation, build_federation, load_source, resolve_labels
from fedfm.learners.base import LocalContext
from fedfm.peft import apply_tuner, get_state, set_state
from fedfm.runtime.device import DeviceTask, resolve_device
from fedfm.runtime.roles import apply_profiles
from fedfm.tasks import build_task
from fedfm.tasks.limits import check_max_length, position_limit, prompt_positions

HOLDOUT_TAG = 0x40D
CONTENT_COLUMNS = ("text", "prompt", "response", "chosen", "rejected")  # what a server-only workbench drops


def split_holdout(clients, fraction: float, seed: int) -> None:
    """Move ``ceil(fraction * n)`` of each client's examples (seeded) to ``eval_indices``."""
    if fraction <= 0:
        return
    for c in clients:
        n = len(c.indices)
        k = min(n - 1, math.ceil(fraction * n)) if n > 1 else 0
        if k <= 0:
            continue
        order = np.random.default_rng(derive_seed(seed, c.cid, HOLDOUT_TAG)).permutation(n)
        held = set(order[:k].tolist())
        c.eval_indices = [i for j, i in enumerate(c.indices) if j in held]
        c.indices = [i for j, i in enumerate(c.indices) if j not in held]


def drop_client_text(federation: Federation) -> None:
    """Free the contents (text, prompts, answers) of every row that is not in the test set;
    labels, groups and any other column stay."""
    frame = federation.frame
    keep = np.zeros(len(frame), dtype=bool)
    keep[federation.test_indices] = True
    rows = np.flatnonzero(~keep)
    for name in CONTENT_COLUMNS:
        if name in frame.columns:
            frame.iloc[rows, frame.columns.get_loc(name)] = None


class Workbench:
    def __init__(self, exp, federation: Federation | None = None, server_only: bool = False):
        self.exp = exp
        self.server_only = server_only
        # Data first: a bad partition fails before the (slow) model load.
        self.federation = federation or build_federation(load_source(exp.data), exp.federation, exp.seed)
        if federation is None:
            resolve_labels(exp, self.federation)  # model.num_labels checked (or inferred) before the model loads
        apply_profiles(self.federation.clients, exp.federation.roles, exp.seed)
        split_holdout(self.federation.clients, exp.federation.client_holdout, exp.seed)
        if server_only:
            drop_client_text(self.federation)
        self.device = resolve_device(exp.runtime.device)  # before the (slow) model load
        self.task = build_task(exp.model.task)
        model, self.tokenizer = self.task.build(exp.model, exp.seed)
        check_max_length(exp.data.max_length, position_limit(model.config), prompt=prompt_positions(exp.peft))  # before any encoding or training
        for field, on in (("train.unpad", exp.train.unpad), ("eval.unpad", exp.eval.unpad)):
            if on:
                from fedfm.learners.unpad import unpad_problem

                problem = unpad_problem(model, field)
                if problem is not None:
                    raise ValueError(f"model '{exp.model.package or exp.model.path}': {problem}")
        pretrained = None
        if exp.model.init_from:
            from fedfm.peft.svd_init import pretrained_weights, svd_targets
            from fedfm.personalize.init_from import load_earlier, load_init

            load_earlier(model, exp.model.init_from)  # the weights the init_from run started from
            targets = svd_targets(exp.peft)
            if targets is not None:  # SLoRA: LoRA from the SVD of that run's update
                pretrained = pretrained_weights(model, targets)
            load_init(model, exp.model.init_from, chain=False)
        torch.manual_seed(derive_seed(exp.seed, 0xADA))
        self.model = apply_tuner(model, exp.peft, exp.model.task)
        if pretrained is not None:
            from fedfm.peft.svd_init import init_from_difference

            init_from_difference(self.model, pretrained)
        if self.device.type != "cpu":
            self.model.to(self.device)
            self.task = DeviceTask(self.task, self.device)
        self.model.eval()
        self.fingerprint = fingerprint(self.model)
        self.template: State = get_state(self.model)  # the initial trainable State (values kept)
        if self.task.bind_initial is not None:  # e.g. DPO's reference for tuners without peft adapters (tasks/dpo.py)
            self.task.bind_initial(self.model, self.template)
        self._encoded: dict[int, dict] = {}
        self._test_rows = set(self.federation.test_indices.tolist()) if server_only else set()
        self._eval_batches: list[dict[str, torch.Tensor]] | None = None

    def _rows(self, rows: list[int]) -> list[dict]:
        missing = sorted({i for i in rows if i not in self._encoded})
        if missing and self.server_only and not self._test_rows.issuperset(missing):
            raise RuntimeError(
                "this is the server side: it holds the test set only, never a client's examples "
                "(a server step that needs them runs on the local backend only)"
            )
        if missing:
            frame = self.federation.frame.iloc[missing]
            self._encoded.update(zip(missing, self.task.encode(frame, self.tokenizer, self.exp.data.max_length)))
        return [self._encoded[i] for i in rows]

    @property
    def clients(self):
        return self.federation.clients

    def initial_state(self) -> State:
        return {k: v.clone() for k, v in self.template.items()}

    def examples(self, cid: int) -> list[dict]:
        return self._rows(list(self.federation.clients[cid].indices))

    def eval_examples(self, cid: int) -> list[dict]:
        return self._rows(list(self.federation.clients[cid].eval_indices))

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
            profile=dict(self.federation.clients[cid].profile),
            round=rnd,
        )

    def batches(self, items: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Evaluation batches, sorted by length so padding is minimal (``eval.sort_by_length``;
        off: in the given order). Metrics are sums over examples, so the order only changes
        the padding of each batch and the order of the float sum."""
        if self.exp.eval.sort_by_length:
            items = sorted(items, key=lambda e: len(e["input_ids"]))
        bs = self.exp.eval.batch_size
        return [self.task.collate(items[i : i + bs], self.tokenizer) for i in range(0, len(items), bs)]

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """Test batches, built once and reused."""
        if self._eval_batches is None:
            self._eval_batches = self.batches(self._rows(self.federation.test_indices.tolist()))
        return self._eval_batches

    def full_state(self, state: State) -> State:
        """``state`` completed with the template's values for names it lacks (local ones)."""
        return {**self.template, **state} if set(state) != set(self.template) else state

    def evaluate(self, state: State, batches: list[dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
        """Metrics of ``state`` under ``torch.inference_mode`` (the same math as no_grad;
        the batches are built outside it, so they stay usable for training); with
        ``eval.unpad``, on real tokens only (learners/unpad.py)."""
        set_state(self.model, self.full_state(state))
        self.model.eval()
        batches = self.eval_batches() if batches is None else batches
        padding_free = contextlib.nullcontext()
        if self.exp.eval.unpad:
            from fedfm.learners.unpad import unpadded

            padding_free = unpadded(self.model)
        with torch.inference_mode(), padding_free:
            return self.task.evaluate(self.model, batches)
