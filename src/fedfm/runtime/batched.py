"""The batched in-process transport: several clients' LoRA training in one forward pass.

``runtime.transport: batched`` with ``runtime.batch_clients: K`` (default 4). The round's
``train`` messages are taken in chunks of ``K``, in the order the loop sent them; for a
chunk, each client's message is prepared by the one client function's first half
(``runtime/client.py`` ``prepare_train``: settle and stage its store, decode the
broadcast, add its local part, ``before_train`` middleware), the ``K`` clients are
trained together by ``learners/multi_lora.py`` ``train_jointly`` (one forward/backward per
step over the concatenation of their batches, each example with its client's LoRA
adapter: multi-adapter batching as in S-LoRA / Punica, Sheng et al. 2024 / Chen et al.
2024), and each update goes through the client function's second half (``finish_train``:
local part to the store, ``after_train`` middleware, exchange-phase hooks, uplink codec
chain). The ``evaluate`` messages of per-client evaluation (``eval.clients``) are taken
in chunks of ``K`` too: the ``K`` clients' personalized models (shared State plus each
one's local part) are evaluated together, one forward pass per batch
(``runtime/batched_eval.py``). Every other phase (extra exchange phases) is answered
exactly as by the in-process transport (``client.handle``, one client at a time).

Failures: a client whose preparation or finishing raises is a failed reply for that client
only. An exception inside the joint training step (or joint evaluation pass) fails EVERY
client of its chunk (they share the step); each failed reply says so and names the
chunk's clients. Nothing falls back to sequential training.

It changes the math (learners/multi_lora.py; docs/speed.md): not bit-identical to the
sequential transport; per-client evaluation metrics may differ in the last float digits
(wider padding). What it cannot do is refused at config time (``batched_problem``).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from fedfm.core.protocols import EVALUATE, TRAIN, Envelope, Reply
from fedfm.peft.state import set_state
from fedfm.runtime.client import ClientEnv, evaluate_reply, finish_train, prepare_evaluate, prepare_train
from fedfm.runtime.transport import answer

log = logging.getLogger("fedfm.runtime")

TASKS = ("text_classification",)


def batched_problem(exp) -> str | None:
    """``runtime.transport: batched`` settings that cannot work; None when fine."""
    rt = exp.runtime
    if rt.transport != "batched":
        if rt.batch_kernel != "auto":
            return f"runtime.batch_kernel: {rt.batch_kernel} needs runtime.transport: batched (got '{rt.transport}')"
        if rt.batch_clients != type(rt).model_fields["batch_clients"].default:
            return f"runtime.batch_clients: {rt.batch_clients} needs runtime.transport: batched (got '{rt.transport}')"
        return None
    where = "runtime.transport: batched (several clients' LoRA in one forward pass)"
    if rt.backend != "local":
        return f"{where} is the local backend's transport; runtime.backend is '{rt.backend}'"
    if exp.peft.method != "lora":
        return f"{where} needs peft.method: lora (got '{exp.peft.method}')"
    if exp.learner.name != "local":
        return f"{where} trains the 'local' learner only (got learner.name '{exp.learner.name}')"
    if exp.model.task not in TASKS:
        return f"{where} supports model.task {list(TASKS)} (got '{exp.model.task}')"
    if exp.train.compile:
        return f"{where} does not support train.compile: true (its adapter layers are patched per batch); turn one off"
    if exp.train.unpad:
        return f"{where} does not support train.unpad: true (its adapters slice the padded batch by client); turn one off"
    if exp.eval.unpad and exp.eval.clients != "none":
        return f"{where} does not support eval.unpad: true (its joint evaluation slices the padded batch by client); turn one off"
    return None


def resolve_kernel(kernel: str, model) -> str:
    """``runtime.batch_kernel``: ``auto`` is ``stacked`` when the model is on a CUDA device
    (a launch-bound step: two bmm per layer for all K clients) and ``segments`` on the CPU
    (one pair of matmuls per client: the sequential ops, no stacking copies)."""
    if kernel != "auto":
        return kernel
    device = next(model.parameters()).device
    return "stacked" if device.type == "cuda" else "segments"


class BatchedTransport:
    name = "local"

    def __init__(
        self,
        env: ClientEnv,
        batch_clients: int = 4,
        kernel: str = "auto",
        on_start: Callable[[int], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ):
        from fedfm.peft.multi_lora import KERNELS, AdapterBatch

        if batch_clients < 1:
            raise ValueError(f"runtime.batch_clients must be >= 1, got {batch_clients}")
        if kernel not in ("auto", *KERNELS):
            raise ValueError(f"runtime.batch_kernel must be one of {['auto', *KERNELS]}, got '{kernel}'")
        self.env, self.k = env, batch_clients
        from fedfm.peft.state import trainable_names

        AdapterBatch(env.wb.model, trainable_names(env.wb.model))  # refuses an unsupported trainable State now, not every round
        self.kernel = resolve_kernel(kernel, env.wb.model)
        self.on_start, self.on_end = on_start, on_end
        self.chunks: list[list[int]] = []  # the client ids of every joint training, in order (for tests and logs)
        self.eval_chunks: list[list[int]] = []  # and of every joint evaluation

    def _end(self) -> None:
        if self.on_end is not None:
            self.on_end()

    def _one(self, e: Envelope, replies: dict[int, Reply]) -> None:
        replies[e.cid] = answer(self.env, e, self.on_start, self.on_end)

    def _chunk(self, chunk: Sequence[Envelope], replies: dict[int, Reply]) -> None:
        from fedfm.learners.multi_lora import train_jointly

        jobs = []
        for e in chunk:
            if self.on_start is not None:
                self.on_start(e.cid)
            try:
                jobs.append(prepare_train(self.env, e))
            except Exception as exc:
                replies[e.cid] = Reply(e.cid, error=f"{type(exc).__name__}: {exc}")
                self._end()
        if not jobs:
            return
        cids = [j.cid for j in jobs]
        self.chunks.append(cids)
        try:
            results = train_jointly([(j.inst, j.ctx) for j in jobs], kernel=self.kernel)
        except Exception as exc:  # the joint step is shared: every client of the chunk fails
            log.warning("batched training of clients %s failed: %s", cids, exc)
            for j in jobs:
                replies[j.cid] = Reply(j.cid, error=f"{type(exc).__name__}: {exc} (in the joint training step of clients {cids})")
                self._end()
            return
        for j, (update, trained) in zip(jobs, results):
            try:
                set_state(self.env.wb.model, trained)  # as after sequential training: the model holds this client's result
                data, info = finish_train(self.env, j, update)
                replies[j.cid] = Reply(j.cid, data=data, info=info)
            except Exception as exc:
                replies[j.cid] = Reply(j.cid, error=f"{type(exc).__name__}: {exc}")
            finally:
                self._end()

    def _eval_chunk(self, chunk: Sequence[Envelope], replies: dict[int, Reply]) -> None:
        from fedfm.runtime.batched_eval import evaluate_jointly

        ready = []
        for e in chunk:
            if self.on_start is not None:
                self.on_start(e.cid)
            try:
                cid, state, items = prepare_evaluate(self.env, e)
                if items:
                    ready.append((cid, state, items))
                    continue
                data, info = evaluate_reply({}, 0)
                replies[e.cid] = Reply(e.cid, data=data, info=info)
            except Exception as exc:
                replies[e.cid] = Reply(e.cid, error=f"{type(exc).__name__}: {exc}")
            self._end()
        if not ready:
            return
        cids = [cid for cid, _, _ in ready]
        self.eval_chunks.append(cids)
        try:
            metrics = evaluate_jointly(self.env.wb, [s for _, s, _ in ready], [it for _, _, it in ready], kernel=self.kernel)
        except Exception as exc:  # the joint pass is shared: every client of the chunk fails
            log.warning("batched evaluation of clients %s failed: %s", cids, exc)
            metrics = [exc] * len(ready)
        for (cid, _, items), m in zip(ready, metrics):
            try:
                if isinstance(m, Exception):
                    replies[cid] = Reply(cid, error=f"{type(m).__name__}: {m} (in the joint evaluation of clients {cids})")
                else:
                    data, info = evaluate_reply(m, len(items))
                    replies[cid] = Reply(cid, data=data, info=info)
            except Exception as exc:
                replies[cid] = Reply(cid, error=f"{type(exc).__name__}: {exc}")
            finally:
                self._end()

    def exchange(self, envelopes: Sequence[Envelope], timeout: float | None = None) -> dict[int, Reply]:
        """Consecutive ``train`` (``evaluate``) messages in chunks of ``batch_clients``,
        every other message one at a time, in the order given."""
        replies: dict[int, Reply] = {}
        run: list[Envelope] = []

        def flush() -> None:
            if run:
                (self._chunk if run[0].phase == TRAIN else self._eval_chunk)(list(run), replies)
                run.clear()

        for e in envelopes:
            if e.phase in (TRAIN, EVALUATE):
                if run and (run[0].phase != e.phase or len(run) == self.k):
                    flush()
                run.append(e)
                continue
            flush()
            self._one(e, replies)
        flush()
        return replies

    def close(self) -> None:
        pass
