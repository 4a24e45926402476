"""Speed switches: runtime.device, eval.sort_by_length and inference_mode, train.autocast,
train.compile, train.bucket_by_length (learners/speed.py, runtime/device.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedfm.config import ConfigError, from_dict
from fedfm.learners import speed
from fedfm.runtime.device import DeviceTask, resolve_device, to_device
from fedfm.runtime.workbench import Workbench


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speed")
    return Workbench(from_dict(tiny_config(tmp, **{"federation.test_examples": 60, "eval.batch_size": 8})))


def test_eval_inference_mode_equals_no_grad_eval(wb):
    # The same batches through the task's own (no_grad) evaluate: identical to the last digit.
    state = wb.initial_state()
    fast = wb.evaluate(state)
    with torch.no_grad():
        plain = wb.task.evaluate(wb.model, wb.eval_batches())
    assert fast == plain


def test_eval_sorted_equals_unsorted(wb):
    # Unsorted batches hold the same examples in file order, padded to a wider width.
    # Accuracy counts are integers: equal. The loss is a float sum in another order over
    # logits computed with other padding widths: equal to 1e-6 relative (measured on this
    # tiny model: docs/speed.md says what differs and why).
    items = wb._rows(wb.federation.test_indices.tolist())
    sorted_ = wb.evaluate(wb.initial_state(), wb.batches(items))
    wb.exp.eval.sort_by_length = False
    try:
        unsorted_batches = wb.batches(items)
    finally:
        wb.exp.eval.sort_by_length = True
    widths = [b["input_ids"].shape[1] for b in unsorted_batches]
    assert sum(widths) >= sum(b["input_ids"].shape[1] for b in wb.batches(items))  # sorting never pads more
    unsorted = wb.evaluate(wb.initial_state(), unsorted_batches)
    assert sorted_["accuracy"] == unsorted["accuracy"]
    assert sorted_["loss"] == pytest.approx(unsorted["loss"], rel=1e-6)


def test_bucketed_batches_by_hand():
    # 8 examples of lengths 8,7,...,1; batch 2; one pool (2 * 16 >= 8), sorted by length:
    # lengths (1,2) (3,4) (5,6) (7,8) in some seeded order, each example exactly once.
    examples = [{"input_ids": [0] * n, "label": 0} for n in range(8, 0, -1)]
    got = list(speed.bucketed(examples, 2, torch.Generator().manual_seed(0)))
    lengths = sorted(tuple(sorted(len(e["input_ids"]) for e in b)) for b in got)
    assert lengths == [(1, 2), (3, 4), (5, 6), (7, 8)]
    again = list(speed.bucketed(examples, 2, torch.Generator().manual_seed(0)))
    assert [[len(e["input_ids"]) for e in b] for b in got] == [[len(e["input_ids"]) for e in b] for b in again]


def test_autocast_switch():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with speed.autocast(lin, "bf16"):
        assert lin(x).dtype == torch.bfloat16
    with speed.autocast(lin, None):
        assert lin(x).dtype == torch.float32
    with pytest.raises(ValueError, match="train.autocast"):
        speed.autocast(lin, "fp8")


def test_compile_once_per_model(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, dynamic=None: calls.append(m) or m)
    m = torch.nn.Linear(2, 2)
    assert speed.compiled(m) == (m, True)
    assert speed.compiled(m) == (m, False)
    assert calls == [m]


def test_train_loop_reports_compile_time(tmp_path, monkeypatch):
    # A stand-in for torch.compile (the real one takes minutes on this CPU): the loop
    # must use the compiled module for the forward and report the first step's time.
    used = []

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, **kw):
            used.append(1)
            return self.m(**kw)

    monkeypatch.setattr(torch, "compile", lambda m, dynamic=None: Wrapped(m))
    from fedfm.runtime.local import LocalRuntime

    rt = LocalRuntime(from_dict(tiny_config(tmp_path, rounds=1, **{"train.compile": True, "train.steps": 2})), tmp_path / "r")
    upd = rt.algo.local_update  # the learner itself, through the client context
    from fedfm.core.types import Instruction

    ctx = rt.wb.context(0, 1)
    update = upd(Instruction(round=1, cid=0, state=rt.wb.initial_state(), config={}), ctx)
    assert len(used) == 2 and update.metrics["compile_s"] > 0


@pytest.mark.parametrize("over, key", [
    ({"train.autocast": "fp16"}, "train.autocast"),
    ({"train.compile": "sometimes"}, "train.compile"),
    ({"train.bucket_by_length": "maybe"}, "train.bucket_by_length"),
    ({"eval.sort_by_length": "maybe"}, "eval.sort_by_length"),
    ({"runtime.device": "tpu"}, "runtime.device"),
    ({"train.autocast": "bf16", "learner": {"name": "mezo"}}, "train.autocast: learner 'mezo'"),
])
def test_switches_are_checked(tmp_path, over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(tiny_config(tmp_path, **over))


def test_device_resolution_and_batches():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="runtime.device is 'cuda'"):
            resolve_device("cuda")
    batch = {"ids": torch.zeros(2, 3), "meta": [torch.ones(1)], "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["n"] == 3 and torch.equal(moved["meta"][0], torch.ones(1))

    class Task:
        max_positions = 7

        def collate(self, examples, tokenizer):
            return {"x": torch.tensor(examples)}

    task = DeviceTask(Task(), torch.device("cpu"))
    assert task.max_positions == 7 and torch.equal(task.collate([1, 2], None)["x"], torch.tensor([1, 2]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_fails_before_the_model_loads(tmp_path):
    with pytest.raises(RuntimeError, match="runtime.device"):
        Workbench(from_dict(tiny_config(tmp_path, **{"runtime.device": "cuda"})))


def test_train_loss_is_summed_left_to_right_without_a_sync_per_step():
    from fedfm.learners.loop import sum_losses

    # float32 1e16 is 10000000272564224; adding 1.0 in float64 rounds back to it (spacing 2),
    # so left to right the sum is 0.0, where a compensated sum (Python 3.12's sum()) gives 1.0
    assert sum_losses([torch.tensor(1e16), torch.tensor(1.0), torch.tensor(-1e16)]) == 0.0
    assert sum_losses([torch.tensor(0.5), torch.tensor(0.25)]) == 0.75
    assert sum_losses([]) == 0.0
