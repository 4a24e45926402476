"""``backdoor_asr``: a measuring server step that records the backdoor's attack success
rate (ASR) of the new global model every round, for evaluation only.

The ASR is ``attacks.backdoor.attack_success_rate``'s: of the test examples whose true
label is not ``target``, the share the model classifies as ``target`` once the trigger's
token ids are inserted at ``position`` (the trigger word attack of Kurita, Michel and
Neubig 2020, "Weight Poisoning Attacks on Pre-trained Models"; in federated learning
Bagdasaryan et al. 2020, "How To Backdoor Federated Learning"). The step runs at stage
``model``, changes nothing and logs ``backdoor_asr.asr`` in metrics.jsonl, so a run shows
whether a backdoor takes hold (the ``backdoor`` attack) or survives (the compromised base
model, ``attacks/compromised_base.py``) round by round.

It needs the base model and the test set (``RoundContext.workbench``): the local backend
and Flower's server side both have them. The triggered test batches are built once.

    server_steps: [{name: backdoor_asr, trigger: cf, target: 1}]
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.pipeline import register_server_step
from fedfm.attacks.backdoor import trigger_ids, triggered_test_set
from fedfm.core.types import State


class AsrProbeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trigger: str = Field("cf", min_length=1, description="trigger phrase of the backdoor measured")
    target: int = Field(1, ge=0, description="class the trigger should produce")
    position: int = Field(1, ge=0, description="token position where the trigger is inserted (1: after [CLS])")


def triggered_batches(wb, trigger: str, target: int, position: int) -> list:
    """The workbench's test examples whose label is not ``target``, triggered, as batches."""
    frame = wb.federation.frame.iloc[wb.federation.test_indices.tolist()]
    clean = wb.task.encode(frame, wb.tokenizer, wb.exp.data.max_length)
    items = triggered_test_set(clean, trigger_ids(wb.tokenizer, trigger), target, position)
    if not items:
        raise ValueError(f"server step backdoor_asr: no test example has a label other than target={target}")
    return wb.batches(items)


class AsrProbe:
    name = "backdoor_asr"
    stage = "model"
    client_state = None  # every client gets the global State

    def __init__(self, params: AsrProbeParams):
        self.p = params
        self._batches: tuple[int, list] | None = None  # (id of the workbench, its triggered batches)

    def __call__(self, model_state: State, ctx, state: State):
        wb = ctx.workbench
        if wb is None:
            raise ValueError("server step backdoor_asr needs the base model and test set (RoundContext.workbench); this round has none")
        if self._batches is None or self._batches[0] != id(wb):
            self._batches = (id(wb), triggered_batches(wb, self.p.trigger, self.p.target, self.p.position))
        asr = float(wb.evaluate(model_state, self._batches[1])["accuracy"])
        return model_state, state, {"asr": asr}


register_server_step("backdoor_asr", AsrProbe, AsrProbeParams)
