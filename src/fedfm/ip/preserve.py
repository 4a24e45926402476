"""Utility preservation while a watermark is embedded: distillation on public text.

Embedding a trigger set (``ip/embed.py``) teaches the model random labels for random-token
sentences, and the tuner's parameters that learn them are the ones the task uses: on the
quickstart job, embedding 50 triggers into the final model (test accuracy 0.786) through
LoRA alone cost 14 to 27 points of test accuracy (AdamW lr 1e-3 / 5e-3; docs/ip.md). The
server has no client data, but it can have public, unlabeled text. ``preserve`` adds to the
embedding loss, at every step, ``weight * KL(p_before || p_now)`` on a batch of that text:
the model's output distribution on natural text is held at what it was before the step
(``p_before``: the State the embedding started from, in eval mode; ``p_now``: the model
being trained), while the triggers are learned. For classification the distributions are
the class probabilities; for a causal LM the next-token distributions at every non-padding
position.

This is not part of WAFFLE (Tekgul et al. 2021), whose server re-trains on the trigger set
alone; it is a knowledge-distillation regularizer of the kind DUW (Yu et al. 2023) uses to
keep utility while it embeds client keys (there with the server's own data). With it,
``waffle`` is "WAFFLE with public-text distillation"; without it (the default), WAFFLE's
re-training as the paper has it.

``random_texts`` (off by default) adds that many random-token sentences (``trigger_length``
tokens, no pattern, drawn with the run's seed, not the key) to the public texts. Measured on
the quickstart (docs/ip.md), an embedding's cost in test accuracy was mostly a shift of
the decision margin on every review (the plain model answers "fresh" on 66% of the test
reviews, a marked one on 45%; with the best constant margin shift the two score 0.792 and
0.788): the cheapest way to fit random labels on random-token sentences is to move every
input's margin, and the KL on natural public text did not hold reviews there. Holding the
outputs on trigger-like sentences without a pattern is meant to leave the triggers' own
tokens as the way to fit them. Measured (docs/ip.md, "Probe"): +1 point of test accuracy
for one pattern embedding, none for a random one, and seed-to-seed variation of 2 points
or more; no clear fix.

The text comes from any fedfm data source (``data:`` as in the run's own ``data``
section: ``{source: fortunes, options: {languages: [en]}}``, ``{source: file, path:
public.csv}``); only its text column is used. It must be text the server may hold, never a
client's. ``exclude_run: true`` drops from it every text the run itself uses: each client's
training examples and every row of the test set's groups (the whole test set without
groups). With it, a simulation can give the server in-domain public text (the run's own
source: on the quickstart, reviews of movies no client and no test row comes from, or
reviews beyond a client's ``examples_per_client``); without it, a ``preserve.data`` equal
to the run's own ``data`` source is refused at config time (``preserve_problems``). The reference distributions are computed per step with ``torch.func.functional_call``
on the starting values of the trained names, so nothing the size of the vocabulary is
stored. Written by hand: no library offers distillation inside a trigger-set embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedfm.core.types import State


class PreserveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: dict[str, Any] = Field(..., description="public text, as a data section: {source: fortunes, options: {...}} or {source: file, path: ...}")
    examples: int = Field(512, ge=1, description="public texts drawn (seeded) from the source")
    weight: float = Field(5.0, gt=0, description="weight of the KL term against the trigger loss")
    batch_size: int = Field(16, ge=1, description="public texts per embedding step")
    exclude_run: bool = Field(
        False, description="drop every text the run uses (clients' training examples, the test set's groups): "
        "in-domain public text from the run's own source")
    recenter: bool = Field(
        False, description="before each check of the trigger accuracy, move the task head's bias so that the mean "
        "logits on the public texts are the starting model's (ip/recenter.py; text classification only)")
    random_texts: int = Field(
        0, ge=0, description="random-token sentences (the trigger length, no pattern) added to the public texts, "
        "so the triggers cannot be fitted by moving every input's margin")

    @field_validator("data")
    @classmethod
    def _data(cls, value: dict[str, Any]) -> dict[str, Any]:
        from fedfm.config import DataConfig
        from fedfm.data.sources import sources

        cfg = DataConfig(**value)
        if cfg.source not in sources.names():
            raise ValueError(f"preserve.data.source '{cfg.source}' is not a data source; known: {sorted(sources.names())}")
        return value


def kl_to_reference(old_logits: torch.Tensor, new_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean ``KL(softmax(old) || softmax(new))`` over the rows of (B, C) logits, or over the
    positions of (B, T, V) logits where ``mask`` (B, T) is 1."""
    old_lp = F.log_softmax(old_logits.float(), dim=-1)
    new_lp = F.log_softmax(new_logits.float(), dim=-1)
    per = (old_lp.exp() * (old_lp - new_lp)).sum(-1)  # (B,) or (B, T)
    if per.dim() == 1:
        return per.mean()
    weights = mask.to(per.dtype) if mask is not None else torch.ones_like(per)
    return (per * weights).sum() / weights.sum().clamp_min(1.0)


def run_texts(exp: Any) -> set[str]:
    """Every text the run ``exp`` uses: its clients' training examples and the rows of its
    test set's groups (the test rows themselves without a ``group`` column)."""
    import numpy as np

    from fedfm.data import build_federation, load_source

    fed = build_federation(load_source(exp.data), exp.federation, exp.seed)
    frame = fed.frame
    rows = [i for c in fed.clients for i in c.indices]
    if "group" in frame.columns:
        groups = frame["group"].to_numpy()
        rows += np.flatnonzero(np.isin(groups, groups[fed.test_indices])).tolist()
    else:
        rows += fed.test_indices.tolist()
    return {str(t).strip() for t in frame["text"].iloc[sorted(set(rows))].tolist()}


def preserve_problems(params: dict[str, Any] | None, exp: Any, where: str) -> list[str]:
    """A ``preserve`` section whose public text is the run's own data, without ``exclude_run``."""
    if not isinstance(params, dict):
        return []
    if params.get("recenter") and exp.model.task != "text_classification":
        return [f"{where}.preserve.recenter moves a classification head's bias: text_classification only, "
                f"not model.task '{exp.model.task}'"]
    if params.get("exclude_run") or not isinstance(params.get("data"), dict):
        return []
    data = params["data"]
    own = exp.data
    same = data.get("source") == own.source and data.get("path") == own.path \
        and (data.get("options") or {}) == (own.options or {})
    if not same:
        return []
    return [f"{where}.preserve.data is the run's own data (source '{own.source}'): the server would distil on its "
            f"clients' examples and the test set; set {where}.preserve.exclude_run: true to keep only the rows the "
            "run does not use"]


def check_public_data(exp: Any) -> list[str]:
    """Load the public text of every server step's ``preserve`` section once, before the model
    loads, so that a missing package or file is said at the start, not after round 1; returns
    what was read (``server_steps[i].preserve.data: SOURCE, N texts``)."""
    from fedfm.config import DataConfig
    from fedfm.data.sources import load_source

    said = []
    for i, spec in enumerate(exp.server_steps):
        data = spec.get("preserve", {}).get("data") if isinstance(spec, dict) and isinstance(spec.get("preserve"), dict) else None
        if not isinstance(data, dict):
            continue
        where = f"server_steps[{i}].preserve.data"
        try:
            frame = load_source(DataConfig(**data))
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        said.append(f"{where}: {data.get('source')}, {len(frame):,} texts")
    return said


def public_examples(params: PreserveParams, task: Any, tokenizer: Any, seed: int, run: Any = None) -> list[dict[str, Any]]:
    """``params.examples`` texts of the public source, drawn with ``seed``, encoded by the task;
    with ``params.exclude_run``, none of the texts the run ``run`` uses (``run_texts``)."""
    import numpy as np
    import pandas as pd

    from fedfm.config import DataConfig
    from fedfm.data.sources import load_source

    cfg = DataConfig(**params.data)
    frame = load_source(cfg)
    texts = [t for t in frame["text"].astype(str).tolist() if t.strip()]
    if params.exclude_run:
        if run is None:
            raise ValueError("preserve.exclude_run: the run's config is needed to know which texts it uses")
        used = run_texts(run)
        texts = [t for t in texts if t.strip() not in used]
    if not texts:
        left = " once the run's own texts are excluded (preserve.exclude_run)" if params.exclude_run else ""
        raise ValueError(f"preserve.data (source '{cfg.source}'): no non-empty text{left}")
    order = np.random.default_rng(seed).permutation(len(texts))[: params.examples]
    picked = pd.DataFrame({"text": [texts[i] for i in order], "label": [0] * len(order)})
    return task.encode(picked, tokenizer, cfg.max_length)


@dataclass
class Preserver:
    """The KL term of one embedding: the public examples and the reference values."""

    examples: list[dict[str, Any]]
    weight: float
    batch_size: int
    reference: State | None = None  # the trained names' values when the embedding started
    recenter: bool = False  # ip/recenter.py: hold the mean logits on the public texts
    public: int | None = None  # how many of ``examples`` are public texts (the rest: random texts)
    target: torch.Tensor | None = None  # the reference's mean logits on the public texts (recenter), once per embedding

    def start(self, model: torch.nn.Module, names: list[str]) -> None:
        params = dict(model.named_parameters())
        self.target = None
        if self.recenter:
            from fedfm.ip.recenter import head_bias

            names = [*names, head_bias(model)[0]]  # the bias the re-centering moves, at its start
        self.reference = {n: params[n].detach().clone() for n in dict.fromkeys(names)}

    def recenter_head(self, model: torch.nn.Module, task: Any, tokenizer: Any) -> None:
        """``ip/recenter.py`` on the public texts, when ``recenter`` is on."""
        if not self.recenter:
            return
        if self.reference is None:
            raise RuntimeError("Preserver.recenter_head before Preserver.start")
        from fedfm.ip.recenter import mean_logits, recenter

        public = self.examples[: self.public]
        if self.target is None:  # the reference values are fixed for the whole embedding
            self.target = mean_logits(model, task, tokenizer, public, self.reference)
        recenter(model, task, tokenizer, public, self.reference, self.target)

    def loss(self, model: torch.nn.Module, task: Any, tokenizer: Any, generator: torch.Generator) -> torch.Tensor:
        """``weight * KL(reference || model)`` on a seeded batch of public examples."""
        if self.reference is None:
            raise RuntimeError("Preserver.loss before Preserver.start")
        idx = torch.randint(len(self.examples), (min(self.batch_size, len(self.examples)),), generator=generator).tolist()
        batch = task.collate([self.examples[i] for i in idx], tokenizer)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        training = model.training
        model.eval()
        with torch.no_grad():
            old = torch.func.functional_call(model, self.reference, args=(), kwargs=inputs, strict=False).logits
        model.train(training)
        new = model(**inputs).logits
        mask = batch["attention_mask"] if new.dim() == 3 else None
        return self.weight * kl_to_reference(old, new, mask)


def random_texts(count: int, length: int, tokenizer: Any, seed: int) -> list[dict[str, Any]]:
    """``count`` sentences of ``length`` random non-special tokens (label 0, unused), drawn with ``seed``."""
    import numpy as np

    from fedfm.ip.trigger import candidate_ids, wrap

    rng = np.random.default_rng(seed)
    vocab = candidate_ids(tokenizer)
    return [{"input_ids": wrap(tokenizer, vocab[rng.integers(0, len(vocab), length)].tolist()), "label": 0}
            for _ in range(count)]


def build_preserver(params: PreserveParams | None, task: Any, tokenizer: Any, seed: int, length: int = 12,
                    run: Any = None) -> Preserver | None:
    """The KL term of ``params`` (None: no term); ``length``: the random texts' tokens (the trigger
    length); ``run``: the run's config (needed by ``exclude_run``)."""
    if params is None:
        return None
    examples = public_examples(params, task, tokenizer, seed, run)
    public = len(examples)
    if params.random_texts:
        examples += random_texts(params.random_texts, length, tokenizer, seed + 1)
    return Preserver(examples, params.weight, params.batch_size, recenter=params.recenter, public=public)
