"""FedDAT: the distillation on hand-built logits, the two steps per batch, the dual adapter's gradients."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fedfm.config import ConfigError, from_dict
from fedfm.core.types import Instruction
from fedfm.peft.adapters import Bottleneck
from fedfm.peft.dual_adapter import DualAdaptedLinear, arm_teachers
from fedfm.personalize.feddat import FedDATLearner, FedDATParams, distillation, feddat_batch, step_loss
from fedfm.runtime import LocalRuntime
from fedfm.runtime.workbench import Workbench


def test_distillation_on_hand_built_logits():
    # teacher logits [ln 3, 0] -> p_t = [3/4, 1/4]; student logits [0, 0] -> p_s = [1/2, 1/2].
    # KD(t -> s) = KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812
    # KD(s -> t) = KL(p_s || p_t) = 1/2 ln(2/3) + 1/2 ln(2)   = -0.202733 + 0.346574 = 0.143841
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.zeros(1, 2, requires_grad=True)
    assert distillation(teacher, student, 1.0).item() == pytest.approx(0.130812, abs=1e-6)
    assert distillation(student, teacher, 1.0).item() == pytest.approx(0.143841, abs=1e-6)
    # T = 3 (the default, the authors' kl_loss), times T^2 = 9:
    # p_t = softmax([ln3 / 3, 0]) = [3^(1/3), 1] / (3^(1/3) + 1) = [0.590541, 0.409459]
    # KD(t -> s) = 9 * (0.590541 ln(0.590541 / 0.5) + 0.409459 ln(0.409459 / 0.5))
    #            = 9 * (0.098288 - 0.081802) = 9 * 0.016486 = 0.148377
    # KD(s -> t) = 9 * (0.5 ln(0.5 / 0.590541) + 0.5 ln(0.5 / 0.409459)) = 9 * 0.016670 = 0.150033
    assert FedDATParams().temperature == 3.0
    assert distillation(teacher, student, 3.0).item() == pytest.approx(0.148377, abs=1e-6)
    assert distillation(student, teacher, 3.0).item() == pytest.approx(0.150033, abs=1e-6)
    # each step's loss is (CE + kd_weight * KD) / 2: label 0 on the student: CE = ln 2 = 0.693147,
    # (0.693147 + 0.148377) / 2 = 0.420762
    ce = torch.nn.functional.cross_entropy(student, torch.tensor([0]))
    assert step_loss(ce, distillation(teacher, student, 3.0), 1.0).item() == pytest.approx(0.420762, abs=1e-6)
    # batchmean: two identical rows give the same value; the source side gets no gradient
    s2, t2 = student.detach().repeat(2, 1).requires_grad_(), teacher.repeat(2, 1).requires_grad_()
    a = distillation(t2, s2, 1.0)
    a.backward()
    assert a.item() == pytest.approx(0.130812, abs=1e-6)
    assert t2.grad is None and s2.grad is not None


class Toy(torch.nn.Module):
    """Embeddings -> one dual-adapted projection -> mean over tokens -> a frozen head."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(10, 4)
        self.proj = DualAdaptedLinear(torch.nn.Linear(4, 4), Bottleneck(4, 2, "tanh", 0.5), Bottleneck(4, 2, "tanh", 0.5))
        self.head = torch.nn.Linear(4, 2)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)
        for p in [*self.emb.parameters(), *self.proj.base.parameters(), *self.head.parameters()]:
            p.requires_grad_(False)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.head(self.proj(self.emb(input_ids)).mean(1)))  # (B, C)


def test_two_optimizer_steps_per_batch_in_the_authors_order():
    """Student step on (CE + KD(DAT -> student)) / 2, then DAT step on (CE + KD(student ->
    DAT)) / 2 against the student's logits from before its step; checked against the same
    losses differentiated separately (SGD, lr 0.1: a parameter moves by -0.1 x its gradient)."""
    model = Toy()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    y = torch.tensor([0, 1])
    batch = {"input_ids": ids, "attention_mask": torch.ones(2, 3, dtype=torch.long), "labels": y}
    arm_teachers(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    h = model.proj.base(model.emb(ids))  # (B, T, H), frozen

    def adapter(prefix, up_weight=None):
        """Bottleneck ``prefix`` at its starting values (``up_weight``: a replacement)."""
        w_up = start[f"{prefix}.up.weight"] if up_weight is None else up_weight
        z = torch.tanh(h @ start[f"{prefix}.down.weight"].T + start[f"{prefix}.down.bias"])
        return z @ w_up.T + start[f"{prefix}.up.bias"]

    def head(out):
        return model.head(out.mean(1))  # (B, C)

    # the student's step: its gradient on the shared up-projection
    w_s = start["proj.shared.up.weight"].clone().requires_grad_()
    t0 = head(h + adapter("proj.shared") + adapter("proj.personal")).detach()  # DAT: frozen copy + personal
    s0 = head(h + adapter("proj.shared", w_s))
    loss_s = step_loss(F.cross_entropy(s0, y), distillation(t0, s0, 3.0), 1.0)
    loss_s.backward()

    def dat_step(target):
        w_p = start["proj.personal.up.weight"].clone().requires_grad_()
        t = head(h + adapter("proj.shared") + adapter("proj.personal", w_p))
        loss = step_loss(F.cross_entropy(t, y), distillation(target, t, 3.0), 1.0)
        loss.backward()
        return loss, start["proj.personal.up.weight"] - 0.1 * w_p.grad

    loss_t, want_personal = dat_step(s0)  # against the student before its step

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    steps = []
    sgd_step = opt.step
    opt.step = lambda: (steps.append(1), sgd_step())
    got_s, got_t = feddat_batch(model, batch, opt, params, FedDATParams(), max_grad_norm=None)
    assert len(steps) == 2  # two optimizer steps for one batch
    assert got_s.item() == pytest.approx(loss_s.item(), rel=1e-6) and got_t.item() == pytest.approx(loss_t.item(), rel=1e-6)
    assert torch.allclose(model.proj.shared.up.weight, start["proj.shared.up.weight"] - 0.1 * w_s.grad, atol=1e-6)
    assert torch.allclose(model.proj.personal.up.weight, want_personal, atol=1e-6)
    # the updated student as the DAT's target would have moved the personal adapter elsewhere
    with torch.no_grad():
        s1 = head(h + model.proj.shared.up(torch.tanh(model.proj.shared.down(h))))
    assert not torch.allclose(dat_step(s1)[1], want_personal, atol=1e-6)
    # the frozen copy still holds the received shared adapter
    assert torch.equal(model.proj.teacher_up_weight, start["proj.shared.up.weight"])


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
    assert update.metrics["steps"] == 2 and update.metrics["optimizer_steps"] == 4  # two steps per batch
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
    with pytest.raises(ConfigError, match="train.compile: learner feddat trains with its own two-step loop"):
        from_dict(_feddat(tiny), overrides=["train.compile=true"])
