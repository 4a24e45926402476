"""Classification by a causal LM's own next-token prediction of label words (a verbalizer).

``model.task: lm_classification`` with ``model.task_options: {template, label_words,
chat_template, padding_side}``: each row's text is rendered into ``template`` (which holds
``{text}`` once, e.g. ``"Review: {text}\\nSentiment:"``), optionally wrapped in the
tokenizer's chat template as the user's turn (the answer then starts the assistant's
turn), and the class logits are the LM's next-token logits at the last real (non-pad)
position, read at the first token of each label word (``label_words[i]`` for class id
``i``, e.g. ``[" negative", " positive"]``). Loss: cross-entropy over those C logits;
metrics ``loss``, ``accuracy`` and ``balanced_accuracy``, as ``text_classification``. No
new parameter is made: the pre-trained LM head that predicts the next word is the
classifier, so a tuner or a black-box prompt (FedBPT, BDPL) starts from a model that
already classifies, instead of from a randomly initialised head pre-training never saw.

The papers: pattern-verbalizer pairs (PET: Schick and Schuetze 2021, "Exploiting Cloze
Questions for Few Shot Text Classification and Natural Language Inference"), prompt-based
fine-tuning with label words (LM-BFF: Gao et al. 2021, "Making Pre-trained Language Models
Better Few-shot Learners"), and black-box prompt tuning through such a verbalizer (BBT:
Sun et al. 2022, "Black-Box Tuning for Language-Model-as-a-Service", which FedBPT
federates; BDPL, Diao et al. 2022, reads one too). Where this differs: those use a masked
LM and read the label words' logits at a ``[MASK]`` token placed in the template; a causal
LM has no mask token, so the answer is the *next* token after the template's end (the
template's answer cue), which is why the cue must close the template. Only a label word's
first token is read (PET and LM-BFF use single-token words); two words whose first tokens
coincide cannot be told apart and are refused, and so is a word whose first token is the
tokenizer's unknown token (a word outside the vocabulary).

Positions: a batch is padded on ``padding_side`` (default: the tokenizer's; SmolLM2's is
right). The answer position is each row's last attention-mask one, plus the positions a
tuner puts before the text (a soft prompt's P virtual tokens, whose logits peft returns
too; a discrete prompt's n tokens). Counted from the end it is the same with or without
them: row b's answer is ``pads_b + 1`` positions before the end (``pads_b`` its trailing
pads), so the model is asked for the logits of the last ``max_b pads_b + 1`` positions
only (transformers' ``logits_to_keep``: one position when left-padded), and the LM head
(a vocabulary of 49,152 on SmolLM2) does not run on the others. With left padding the task passes position ids counted over
the real tokens (``mask.cumsum - 1``), so a row's logits do not depend on the side it was
padded on. peft's prompt tuning and P-tuning drop position ids and would put the pads
between the prompt and the text, so left padding is refused with them (config time).

Truncation keeps the template whole: the rendered row is tokenized once (offsets on), and
when it is longer than ``data.max_length`` the last tokens that lie wholly inside the text
are dropped, so the answer cue is never cut; a template that alone leaves no room is
refused naming ``data.max_length``. Written by hand: neither transformers nor peft has a
verbalizer task for causal LMs.
"""

from __future__ import annotations

from typing import Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedfm.tasks.base import register_task, tasks
from fedfm.tasks.causal_lm import _has_special, pad_id
from fedfm.tasks.class_tally import ClassTally
from fedfm.tasks.limits import check_max_length, model_prompt_positions, position_limit
from fedfm.tasks.loading import load_auto

NAME = "lm_classification"
PLACE = "{text}"
SENTINEL = "\x00fedfm-text\x00"  # stands for the text while the chat template renders
# peft methods that prepend virtual tokens and ignore position ids (left padding refused)
NO_POSITION_IDS = ("prompt_tuning", "p_tuning", "personal_prompt")


class VerbalizerParams(BaseModel):
    """``model.task_options`` of ``lm_classification``."""

    model_config = ConfigDict(extra="forbid")
    label_words: list[str] = Field(..., min_length=2, description="one word per class id, in label order, e.g. [' negative', ' positive']")
    template: str = Field("Review: {text}\nSentiment:", description="the row's text rendered into it; must hold {text} once and end with the answer cue")
    chat_template: bool = Field(False, description="wrap the rendered template as the user's turn of the tokenizer's chat template")
    padding_side: Literal["left", "right"] | None = Field(None, description="side the batches are padded on; default the tokenizer's")

    @field_validator("template")
    @classmethod
    def _one_text(cls, value: str) -> str:
        count = value.count(PLACE)
        if count != 1:
            raise ValueError(f"the template must hold {PLACE} exactly once (found {count} in {value!r})")
        return value

    @field_validator("label_words")
    @classmethod
    def _distinct(cls, words: list[str]) -> list[str]:
        empty = [w for w in words if not w.strip()]
        if empty:
            raise ValueError(f"label words must not be blank (got {empty})")
        twice = sorted({w for w in words if words.count(w) > 1})
        if twice:
            raise ValueError(f"label words must differ (repeated: {twice})")
        return words


def render_frame(tokenizer: Any, params: VerbalizerParams) -> tuple[str, str]:
    """(text before the row's text, text after it): the template, chat-wrapped if asked."""
    filled = params.template.replace(PLACE, SENTINEL)
    if params.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("model.task_options.chat_template: the tokenizer has no chat template")
        filled = tokenizer.apply_chat_template([{"role": "user", "content": filled}], tokenize=False, add_generation_prompt=True)
    if filled.count(SENTINEL) != 1:
        raise ValueError("model.task_options.chat_template: the chat template did not keep the text once")
    before, after = filled.split(SENTINEL)
    return before, after


def label_token_ids(tokenizer: Any, words: list[str], num_labels: int | None) -> list[int]:
    """The first token id of each label word, checked: one word per label, none empty,
    none starting with the unknown token, no two sharing their first token."""
    if num_labels is not None and len(words) != num_labels:
        raise ValueError(f"model.task_options.label_words: {len(words)} words {words} for {num_labels} labels "
                         f"(model.num_labels / the data's labels); give one word per label, in label order")
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)  # None: no unknown token (byte-level BPE)
    for word in words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"model.task_options.label_words: {word!r} tokenizes to no token")
        if unk is not None and tokens[0] == unk:
            raise ValueError(f"model.task_options.label_words: {word!r} starts with a token the vocabulary does not hold "
                             f"(it reads as the unknown token {tokenizer.unk_token!r}, which any unknown text shares): "
                             "pick a word the tokenizer knows")
        ids.append(int(tokens[0]))
    for i, a in enumerate(ids):
        for j in range(i):
            if ids[j] == a:
                raise ValueError(f"model.task_options.label_words: {words[j]!r} and {words[i]!r} start with the same "
                                 f"token ({a}, {tokenizer.convert_ids_to_tokens(a)!r}); their classes could not be told "
                                 f"apart: pick words whose first tokens differ")
    return ids


def encode_row(tokenizer: Any, before: str, text: str, after: str, max_length: int, special: bool) -> list[int]:
    """Token ids of ``before + text + after``; when longer than ``max_length``, the last
    tokens lying wholly inside ``text`` are dropped (the template is never cut)."""
    enc = tokenizer(before + text + after, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    excess = len(ids) - max_length
    if excess <= 0:
        return ids
    start, end = len(before), len(before) + len(text)
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s >= start and e <= end]
    if len(inside) < excess:
        raise ValueError(f"data.max_length={max_length}: the template (model.task_options.template) alone takes "
                         f"{len(ids) - len(inside)} tokens; raise data.max_length or shorten the template")
    drop = set(inside[len(inside) - excess:])
    return [t for i, t in enumerate(ids) if i not in drop]


def side_padded(rows: list[list[int]], value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, T): rows padded with ``value`` on ``side`` to the longest."""
    width = max(len(r) for r in rows)
    pads = [[value] * (width - len(r)) for r in rows]
    ids = [p + list(r) if side == "left" else list(r) + p for r, p in zip(rows, pads)]
    mask = [[0] * len(p) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(p) for r, p in zip(rows, pads)]
    return torch.tensor(ids, dtype=torch.long).reshape(len(rows), width), torch.tensor(mask, dtype=torch.long).reshape(len(rows), width)


def real_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the real tokens: (B, T), pads at 0."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def trailing_pads(mask: torch.Tensor) -> torch.Tensor:
    """(B,) how many positions follow each row's last real token (0 when left-padded)."""
    return mask.flip(1).argmax(1)


def answer_logits(logits: torch.Tensor, mask: torch.Tensor, label_ids: list[int]) -> torch.Tensor:
    """(B, K, V) logits of a batch whose mask is (B, T) -> (B, C): each row's next-token
    logits at its last real position, at the label words' first tokens.

    Counted from the end: the answer of row b is ``trailing_pads[b] + 1`` positions before
    the end, whatever a tuner put before the text (a soft prompt's logits, K = P + T) and
    however many of the first positions the model skipped (``logits_to_keep``, K < T)."""
    back = trailing_pads(mask).to(logits.device)  # (B,)
    if logits.shape[1] <= int(back.max()):
        raise ValueError(f"logits cover {logits.shape[1]} positions; the batch's answers need the last {int(back.max()) + 1}")
    rows = torch.arange(mask.shape[0], device=logits.device)
    return logits[rows, logits.shape[1] - 1 - back][:, label_ids].float()  # (B, C)


class LMClassification:
    """Cross-entropy over the label words' next-token logits; metrics: loss, accuracy and
    balanced accuracy (tasks/class_tally.py)."""

    finish = None  # a Task hook this task does not use
    params: VerbalizerParams | None = None
    label_ids: list[int] = []
    before: str = ""
    after: str = ""
    special: bool = True  # whether the tokenizer adds its special tokens (no chat template)
    side: str = "right"
    max_positions: int | None = None  # the model's position table, once built
    virtual_tokens: int = 0  # positions a peft soft prompt takes before the text, once tuned

    def build(self, model_cfg: Any, seed: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        params = tasks.parse(NAME, model_cfg.task_options, "model.task_options")
        model, directory = load_auto(AutoModelForCausalLM, model_cfg, seed)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # scoring needs no KV cache
        self.max_positions = position_limit(model.config)
        self.configure(tokenizer, params, model_cfg.num_labels)
        return model, tokenizer

    def configure(self, tokenizer: Any, params: VerbalizerParams, num_labels: int | None) -> None:
        """The template's two halves, the label words' token ids and the padding side,
        checked against the tokenizer (before any encoding or training)."""
        self.params = params
        self.before, self.after = render_frame(tokenizer, params)
        self.special = not _has_special(tokenizer, self.before + self.after)
        self.label_ids = label_token_ids(tokenizer, params.label_words, num_labels)
        self.side = params.padding_side or getattr(tokenizer, "padding_side", "right") or "right"

    def bind_initial(self, model: torch.nn.Module, initial: Any) -> None:
        """The tuned model, once: the positions its soft prompt takes, counted against the
        position table when encoding."""
        self.virtual_tokens = model_prompt_positions(model)

    def encode(self, frame: pd.DataFrame, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        check_max_length(max_length, self.max_positions, prompt=self.virtual_tokens)
        if self.params is None:
            raise RuntimeError("lm_classification: build the task (or configure it) before encoding")
        labels = frame["label"].astype(int).tolist()
        texts = frame["text"].astype(str).tolist()
        return [{"input_ids": encode_row(tokenizer, self.before, t, self.after, max_length, self.special), "label": y}
                for t, y in zip(texts, labels)]

    def collate(self, examples: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        ids, mask = side_padded([e["input_ids"] for e in examples], pad_id(tokenizer), self.side)  # (B, T)
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)  # (B,)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def class_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, C): the label words' logits at each row's answer position."""
        mask = batch["attention_mask"]
        # only the last positions that hold an answer go through the LM head (a fifth of
        # SmolLM2's forward when every position does)
        keep = int(trailing_pads(mask).max()) + 1
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": mask, "logits_to_keep": keep}
        if self.side == "left":
            kwargs["position_ids"] = real_positions(mask)
        return answer_logits(model(**kwargs).logits, mask, self.label_ids)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.class_logits(model, batch), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches) -> dict[str, float]:
        tally = ClassTally()
        for batch in batches:
            tally.add(self.class_logits(model, batch), batch["labels"])  # (B, C)
        return tally.metrics()


register_task(NAME, LMClassification, VerbalizerParams)


def verbalizer_problems(exp) -> list[str]:
    """Config-time checks that need no tokenizer: the options belong to this task, one
    word per label when ``model.num_labels`` is set, a label column, and no left padding
    under a soft prompt that drops position ids."""
    if exp.model.task != NAME:
        return []
    try:
        params = tasks.parse(NAME, exp.model.task_options, "model.task_options")
    except ValueError:
        return []  # the registry check reports it
    problems = []
    n = exp.model.num_labels
    if n is not None and len(params.label_words) != n:
        problems.append(f"model.task_options.label_words: {len(params.label_words)} words for model.num_labels={n}; "
                        "give one word per label, in label order")
    if exp.data.label_column is None:
        problems.append("model.task lm_classification needs labels: data.label_column is null")
    if params.padding_side == "left" and exp.peft.method in NO_POSITION_IDS:
        problems.append(f"model.task_options.padding_side: left is not supported with peft.method {exp.peft.method} "
                        "(peft drops position ids under a prepended soft prompt, so the pads would sit between the prompt "
                        "and the text); use right")
    return problems
