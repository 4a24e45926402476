"""FedBPT on a causal LM: the API's loss is the loss of the continuation given the soft
prompt (the virtual tokens' logits skipped), and a federated run moves only the prompt."""

from __future__ import annotations

import pytest
import torch

from fedfm.aggregators.fedbpt import projection, prompt_name
from fedfm.config import from_dict
from fedfm.core.types import MODEL
from fedfm.learners.blackbox_api import make_inference_api
from fedfm.runtime.local import LocalRuntime
from fedfm.tasks.causal_lm import IGNORE, continuation_logits

from tiny_llm import tiny_llm_config

pytestmark = pytest.mark.usefixtures("one_thread")


def fedbpt_lm_raw(tmp_path):
    raw = tiny_llm_config(tmp_path)
    raw["federation"]["examples_per_client"] = 16
    raw["federation"]["test_examples"] = 16
    raw["peft"] = {"method": "prompt_tuning", "num_virtual_tokens": 3}
    raw["learner"] = {"name": "fedbpt", "dim": 6, "generations": 2, "popsize": 4, "sigma0": 1.0}
    raw["server_steps"] = [{"name": "non_state_payload"}]
    raw["train"] = {"batch_size": 8}
    return raw


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fedbpt_lm")
    rt = LocalRuntime(from_dict(fedbpt_lm_raw(tmp)), tmp / "out")
    rt.run()
    return rt


def test_continuation_logits_drop_the_virtual_positions():
    # (B=1, P+T=5, V=2) against T=3 labels: positions 2, 3, 4 are the sequence's own
    logits = torch.arange(10.0).view(1, 5, 2)
    kept = continuation_logits(logits, torch.zeros(1, 3, dtype=torch.long))
    assert kept.tolist() == [[[4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]]
    assert continuation_logits(logits, torch.zeros(1, 5, dtype=torch.long)) is logits  # no prompt: unchanged
    with pytest.raises(ValueError, match="fewer than"):
        continuation_logits(logits, torch.zeros(1, 6, dtype=torch.long))


def test_api_loss_is_the_continuation_loss_given_the_prompt(run):
    wb = run.wb
    name = prompt_name(wb.template)
    api = make_inference_api(wb.model, wb.task, name)
    batch = wb.task.collate(wb.examples(0)[:4], wb.tokenizer)
    prompt = torch.randn(api.prompt_shape, generator=torch.Generator().manual_seed(1))
    # by hand, through the base model: [prompt; embed(ids)] with the mask extended by ones,
    # the logits of the last T positions, next-token cross-entropy on the labelled tokens
    base = wb.model.get_base_model()
    embeds = base.get_input_embeddings()(batch["input_ids"])  # (B, T, H)
    b, t = batch["input_ids"].shape
    full = torch.cat([prompt.unsqueeze(0).expand(b, -1, -1), embeds], 1)  # (B, P + T, H)
    mask = torch.cat([torch.ones(b, prompt.shape[0], dtype=torch.long), batch["attention_mask"]], 1)
    with torch.no_grad():
        logits = base(inputs_embeds=full, attention_mask=mask).logits[:, prompt.shape[0]:]  # (B, T, V)
    target = batch["labels"][:, 1:]
    by_hand = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE
    )
    assert api.loss(prompt, batch) == pytest.approx(float(by_hand), rel=1e-5)
    assert api.logits(prompt, batch).shape == (b, t, logits.shape[-1])
    # the prompt matters: another prompt gives another loss
    assert api.loss(torch.zeros(api.prompt_shape), batch) != pytest.approx(float(by_hand), rel=1e-5)


def test_a_causal_lm_run_moves_only_the_prompt_and_reports_perplexity(run):
    ss = run.loop.server_state
    name = prompt_name(ss[MODEL])
    dist = ss["fedbpt.dist"]
    assert bool((dist["mean"] != 0).any())
    p0 = run.wb.template[name]
    a = projection(p0.numel(), 6, 0, 0.05)
    assert torch.allclose(ss[MODEL][name], p0 + (a @ dist["mean"].float()).view_as(p0), atol=1e-5)
    import json

    rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["perplexity"] > 1.0 for r in rows)
    assert rows[1]["perplexity"] != rows[0]["perplexity"]  # the moved prompt changes the held-out loss


def test_config_accepts_causal_lm_and_names_the_supported_tasks(tmp_path):
    from fedfm.components import combination_problems
    from fedfm.learners.zo_checks import zeroth_order_config_problems

    exp = from_dict(fedbpt_lm_raw(tmp_path))
    assert exp.model.task == "causal_lm" and combination_problems(exp) == []
    other = exp.model_copy(update={"model": exp.model.model_copy(update={"task": "masked_lm"})})
    problems = zeroth_order_config_problems(other)
    assert len(problems) == 1 and "masked_lm is not supported (supported: text_classification, causal_lm, lm_classification)" in problems[0]
