"""Direct Preference Optimization as an objective of the causal LM task
(``model.objective: {name: dpo, beta: 0.1}``).

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model"; federated as in OpenFedLLM (Ye et al. 2024, "OpenFedLLM: Training Large
Language Models on Decentralized Private Data via Federated Learning"): every client runs
DPO on its own preference pairs and the server aggregates the adapters like any other
update. For a prompt x with a chosen answer y_w and a rejected answer y_l,

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

where log pi(y|x) is the summed log-probability of the answer tokens under the trained
model and ref is the reference model. The implicit rewards are
``beta * (log pi - log ref)`` of each answer.

The reference model is the model every run starts from (the policy at round 0), fixed
across rounds, as in DPO, and no second copy of the base model is held for it: the model's
initial trainable State is re-applied for the reference pass only, through
``torch.func.functional_call`` (the parameters are substituted in the forward pass; the
model is not modified). That State is the workbench's template (``runtime/workbench.py``
hands it over once through ``bind_initial``), which the workbench holds anyway: for
``full`` it is a float32 CPU copy of every weight, the one copy a full fine-tune already
costs; no further copy is made unless the model lives on another device or dtype, where
each reference pass converts the tensors it substitutes (a temporary copy per batch).

This serves every tuner alike: those that change or wrap the base weights (``full``,
``bitfit``, ``salience``, the hand-written ``adapter``, ...), the peft adapters, and
peft's soft prompts (``prompt_tuning``, ``prefix_tuning``, ``p_tuning``), whose initial
prompt already changes every output: their reference keeps the initial prompt. Switching
the adapters off (peft's ``disable_adapter()``) gives the starting policy only for adapters
that start as the identity (``IDENTITY_TUNERS``: LoRA's and FFA-LoRA's B start at zero,
IA3's vectors at one); it remains the reference of ``reference_logps`` called without an
initial State on such a model, and is refused for every other (``needs_initial``).

So at round 0 policy = reference for every tuner: both implicit rewards are exactly 0,
``reward_accuracy`` is 0 and the loss is log 2.

Written here rather than taken from TRL's ``DPOTrainer``: the trainer owns its training
loop, model copies and data collation, while fedfm's learners own the loop; the loss
itself is the three lines of ``dpo_loss``.

Rows hold ``prompt``, ``chosen`` and ``rejected`` (``data.source: preferences``). With
``format: plain`` the answer follows the prompt text directly (continuations); with
``format: chat`` the pair is rendered with the model's chat template, as instruction
pairs are. Only the answer tokens count; chosen and rejected rows go through the model
in one batch. With a soft prompt on the input (prompt tuning, P-tuning), the logits of
its P virtual tokens come first and are dropped before the answer tokens are scored
(``causal_lm.continuation_logits``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.tasks.causal_lm import (
    GENERATION_PROMPTS,
    IGNORE,
    _ids,
    blank_rows,
    collate_lm,
    continuation_logits,
    encode_pair,
    generate,
    join_cut,
    render_prompt,
)
from fedfm.core.types import State
from fedfm.tasks.objectives import register_objective

# peft tuners whose adapters start as the identity: disabling them gives the starting policy.
IDENTITY_TUNERS = ("lora", "ffa_lora", "ia3")


class DpoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="strength of the pull towards the reference model (DPO's beta)")
    format: Literal["plain", "chat"] = Field(
        "plain", description="plain: answer appended to the prompt text; chat: rendered with the chat template"
    )


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward), each (B,), from summed answer
    log-probabilities (B,) of the policy and the reference."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    losses = -torch.nn.functional.logsigmoid(chosen_reward - rejected_reward)
    return losses, chosen_reward, rejected_reward


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probability of the labelled tokens; logits (B, T, V) predict t+1 from
    t. Logits (B, P + T, V) of a model with a soft prompt on its input: the P virtual
    positions are dropped first (``continuation_logits``)."""
    logits = continuation_logits(logits, labels)  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    mask = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (picked * mask).sum(-1)


def needs_initial(model: torch.nn.Module) -> bool:
    """Whether only the initial State can give ``model``'s reference, disabling its adapters
    would not: a model without peft adapters, or a peft soft prompt (prompt tuning, prefix
    tuning, P-tuning), whose disabled form is the prompt-free model, not the start."""
    if getattr(model, "disable_adapter", None) is None:
        return True
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@contextmanager
def reference_model(model: torch.nn.Module):
    """The base model: ``model`` with its peft adapters disabled for the block.

    peft re-enables adapters by marking every adapter weight trainable, which would undo
    a tuner that freezes some of them (FFA-LoRA's A matrices); the ``requires_grad`` flags
    are restored as they were."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise ValueError(
            "model.objective dpo: the reference model is the base model with the adapters disabled, "
            f"but the model ({type(model).__name__}) has no peft adapter; use peft.method in {list(IDENTITY_TUNERS)}"
        )
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with disable():
            yield model
    finally:
        for p, trainable in flags:
            p.requires_grad_(trainable)


def logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) answer log-probabilities of a DPO batch (chosen rows first, then rejected)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return answer_logps(logits, batch["labels"])


def reference_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], initial: State | None = None) -> torch.Tensor:
    """(2B,) answer log-probabilities under the reference: with ``initial`` (the model's
    initial trainable State), the model with its trainable parameters replaced by it for
    this pass only; without, the base model with the peft adapters disabled (the start of a
    tuner whose adapters begin as the identity; refused where it is not, ``needs_initial``)."""
    if initial is None:
        if needs_initial(model):
            raise ValueError(
                "model.objective dpo: no initial State was bound (bind_initial; the workbench does it when it "
                "builds the model), and this model's reference needs it: it has no peft adapter to disable, or "
                "a soft prompt, whose disabled form is not where the run started"
            )
        with torch.no_grad(), reference_model(model):
            return logps(model, batch)
    params = dict(model.named_parameters())
    unknown = sorted(set(initial) - set(params))
    if unknown:
        raise KeyError(f"model.objective dpo: the initial State names {unknown[:3]}, which the model does not have")
    swapped = {k: v.to(params[k].device, params[k].dtype) for k, v in initial.items()}
    with torch.no_grad():
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = torch.func.functional_call(model, swapped, (), kwargs, tie_weights=True, strict=False).logits
    return answer_logps(logits, batch["labels"])


class DPO:
    """Objective: DPO loss on (prompt, chosen, rejected); metrics on held-out pairs."""

    model_name = "the model"  # model.package or model.path, for messages (set by the task)

    def __init__(self, params: DpoParams):
        self.params = params
        self.initial: State | None = None  # the reference: the model's initial trainable State

    def bind_initial(self, model: torch.nn.Module, initial: State) -> None:
        """Remember the model's initial trainable State (the workbench's template, not
        copied): the reference, for every tuner."""
        self.initial = initial

    def _encode_one(self, tokenizer: Any, prompt: str, answer: str, max_length: int) -> dict[str, list[int]]:
        if self.params.format == "chat":
            return encode_pair(tokenizer, prompt, answer, max_length, self.model_name)
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return join_cut(list(p), _ids(tokenizer, answer), max_length)

    def encode(self, frame: pd.DataFrame, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in frame.columns]
        if missing:
            raise ValueError(
                f"model.objective dpo: the data has no {missing} column(s); use data.source: preferences "
                f"(columns: {', '.join(map(str, frame.columns))})"
            )
        if self.params.format == "plain":
            for column in ("chosen", "rejected"):
                blank = blank_rows(frame, column)
                if blank:
                    raise ValueError(f"model.objective dpo (format: plain): {blank} have an empty {column} answer, "
                                     "which has no token to score: fill or drop them")
        out, same = [], []
        rows = zip(frame.index, frame["prompt"].astype(str), frame["chosen"].astype(str), frame["rejected"].astype(str))
        for i, p, c, r in rows:
            chosen = self._encode_one(tokenizer, p, c, max_length)
            rejected = self._encode_one(tokenizer, p, r, max_length)
            if chosen["input_ids"] == rejected["input_ids"]:
                same.append(int(i) + 1)
            longest = max(chosen, rejected, key=lambda e: len(e["input_ids"]))
            # input_ids/labels: the longer answer, so length sorting and padding see the pair's width
            out.append({**longest, "chosen": chosen, "rejected": rejected})
        if same:
            raise ValueError(
                f"model.objective dpo: {len(same)} pair(s) (data rows {', '.join(map(str, same[:5]))}, counted from 1) have "
                f"the same tokens for the chosen and the rejected answer once cut to data.max_length={max_length} (or "
                "once tokenized): their loss is log 2 whatever the model does and they never count as won; raise "
                "data.max_length or drop those pairs"
            )
        return out

    def collate(self, examples: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """One padded batch of 2B rows: the B chosen rows, then the B rejected rows."""
        return collate_lm([e["chosen"] for e in examples] + [e["rejected"] for e in examples], tokenizer)

    def pair_terms(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        policy = logps(model, batch)  # (2B,)
        ref = reference_logps(model, batch, self.initial)  # (2B,)
        b = policy.shape[0] // 2
        losses, rc, rr = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], self.params.beta)
        return losses, rc, rr, policy[:b], policy[b:]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pair_terms(model, batch)[0].mean()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches) -> dict[str, float]:
        """Means over held-out pairs: DPO ``loss``; ``reward_accuracy`` (share of pairs whose
        chosen reward is strictly above the rejected one: 0 before training, when both
        rewards are 0); ``reward_margin`` (chosen - rejected reward); ``chosen_logp`` and
        ``rejected_logp`` (summed answer log-probabilities under the trained model)."""
        sums = {"loss": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0, "chosen_reward": 0.0,
                "rejected_reward": 0.0, "chosen_logp": 0.0, "rejected_logp": 0.0}
        pairs = 0
        for batch in batches:
            losses, rc, rr, pc, pr = self.pair_terms(model, batch)
            sums["loss"] += losses.sum().item()
            sums["reward_accuracy"] += (rc > rr).float().sum().item()
            sums["reward_margin"] += (rc - rr).sum().item()
            sums["chosen_reward"] += rc.sum().item()
            sums["rejected_reward"] += rr.sum().item()
            sums["chosen_logp"] += pc.sum().item()
            sums["rejected_logp"] += pr.sum().item()
            pairs += int(rc.shape[0])
        out = {k: v / max(pairs, 1) for k, v in sums.items()}
        out["eval_pairs"] = float(pairs)
        return out

    def finish(self, model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, held_out: pd.DataFrame) -> Path:
        """Greedy continuations of the first held-out prompts, beside their chosen and
        rejected answers, to ``out_dir/generations.jsonl``."""
        path = Path(out_dir) / "generations.jsonl"
        rows = []
        for _, row in held_out.head(GENERATION_PROMPTS).iterrows():
            prompt = str(row["prompt"])
            text = render_prompt(tokenizer, prompt, self.model_name) if self.params.format == "chat" else prompt
            rows.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"],
                         "generation": generate(model, tokenizer, text)})
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return path


register_objective("dpo", DPO, DpoParams)
