"""FedDAT: the mutual distillation on hand-built logits; the dual adapter's gradients."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedfm.config import ConfigError, from_dict
from fedfm.core.types import Instruction
from fedfm.personalize.feddat import FedDATLearner, FedDATParams, mutual_distillation
from fedfm.runtime import LocalRuntime
from fedfm.runtime.workbench import Workbench


def test_mutual_distillation_on_hand_built_logits():
    # teacher logits [ln 3, 0] -> p_t = [3/4, 1/4]; student logits [0, 0] -> p_s = [1/2, 1/2].
    # KD(t -> s) = KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812
    # KD(s -> t) = KL(p_s || p_t) = 1/2 ln(2/3) + 1/2 ln(2)   = -0.202733 + 0.346574 = 0.143841
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.zeros(1, 2, requires_grad=True)
    to_student, to_teacher = mutual_distillation(student, teacher, 1.0)
    assert to_student.item() == pytest.approx(0.130812, abs=1e-6)
    assert to_teacher.item() == pytest.approx(0.143841, abs=1e-6)
    # T = 2: p_t = softmax([ln3/2, 0]) = [sqrt3, 1]/(sqrt3 + 1) = [0.633975, 0.366025]
    # KD(t -> s) = 4 * (0.633975 ln(1.267949) + 0.366025 ln(0.732051)) = 4 * 0.036341 = 0.145363
    # KD(s -> t) = 4 * (1/2 ln(0.5/0.633975) + 1/2 ln(0.5/0.366025)) = 4 * 0.037252 = 0.149009
    to_student, to_teacher = mutual_distillation(student, teacher, 2.0)
    assert to_student.item() == pytest.approx(0.145363, abs=1e-6)
    assert to_teacher.item() == pytest.approx(0.149009, abs=1e-6)
    # batchmean: two identical rows give the same value; the source side gets no gradient
    s2, t2 = student.detach().repeat(2, 1).requires_grad_(), teacher.repeat(2, 1).requires_grad_()
    a, _ = mutual_distillation(s2, t2, 1.0)
    a.backward()
    assert a.item() == pytest.approx(0.130812, abs=1e-6)
    assert t2.grad is None and s2.grad is not None


def _feddat(tiny):
    tiny["peft"] = {"method": "dual_adapter", "reduction_factor": 4, "local": ["*.personal.*"]}
    tiny["learner"] = {"name": "feddat", "kd_weight": 1.0, "temperature": 2.0}
    return tiny


def test_feddat_trains_both_adapters_and_keeps_the_personal_one_home(tmp_path, tiny):
    exp = from_dict(_feddat(tiny), overrides=["rounds=1", "train.steps=2"])
    wb = Workbench(exp)
    ctx = wb.context(0, 1)
    inst = Instruction(round=1, cid=0, state=wb.initial_state())
    update = FedDATLearner(FedDATParams(temperature=2.0)).local_update(inst, ctx)
    shared = [k for k in update.payload if ".shared." in k]
    personal = [k for k in update.payload if ".personal." in k]
    # tiny BERT, houlsby: 2 layers x 2 placements x 4 tensors (down w/b, up w/b) per adapter
    assert len(shared) == len(personal) == 16
    assert any(update.payload[k].abs().sum() > 0 for k in shared)
    assert any(update.payload[k].abs().sum() > 0 for k in personal)
    # the frozen teacher copy still holds the received global adapter
    m = next(m for m in wb.model.modules() if hasattr(m, "teacher_up_weight"))
    name = next(n for n, mod in wb.model.named_modules() if mod is m)
    assert torch.equal(m.teacher_up_weight, inst.state[f"{name}.shared.up.weight"])

    out = tmp_path / "run"
    LocalRuntime(from_dict(_feddat(tiny), overrides=["rounds=1", "train.steps=2"]), out).run()
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])
    assert row["clients"] == [0, 1] and row["rejected"] == []


def test_feddat_needs_the_dual_adapter(tmp_path, tiny):
    tiny["learner"] = {"name": "feddat"}
    with pytest.raises(ConfigError, match="dual_adapter"):
        from_dict(tiny)
