"""``waffle``: embed the server's watermark into the global model after every aggregation.

WAFFLE (Tekgul, Xia, Marchal and Asokan 2021, "WAFFLE: Watermarking in Federated
Learning"): the server, which sees no client data, re-trains each new global model on its
own trigger set until the watermark accuracy reaches a threshold, so every model it sends
out (and any model a client walks away with) carries the watermark. Implemented: the
re-training step as a server step at stage ``model`` with a step budget, the trigger set
regenerated from a secret key (``trigger.py``: random-token sentences with assigned labels
for classification, random prompts with fixed continuations for causal LMs), metrics
``waffle.wm_accuracy`` (after the step), ``waffle.steps`` and ``waffle.seconds`` per round.
``trigger: pattern`` gives WAFFLEPattern triggers adapted to text (``trigger.py``: many
secret token patterns, each with its own label, on random-token fillers; verified by one
majority vote per pattern, ``verify.py``). Not implemented: the paper's pre-training of the
initial model on the trigger set before round 1 (here round 1's step embeds it).
Added, off by default: ``rounds: last``, which embeds only after the last round's
aggregation (the model the federation publishes) and leaves the global model of the other
rounds as FedAvg made it; meant for use with ``client_watermark``'s ``owner_key``, which
marks every copy a client receives, so no model that leaves the server is unmarked
(docs/ip.md measures what it saves). And ``preserve``, a distillation term on public text that holds the
model's outputs on natural text while the triggers are learned (``ip/preserve.py``; not in
the paper; on the quickstart job WAFFLE alone cost 15 points of test accuracy, docs/ip.md).

The key is given as ``key`` (it is then written into the run's config.yaml) or, to keep it
out of every file, as ``key_env``, the name of an environment variable of the server
process. With ``peft.local``, only the shared names are trained (the local ones keep the
template's values during the step) and only they are returned. The task head is not
trained by default (``freeze``): re-training it on random-token triggers flipped most
predictions on real reviews in a measurement (ip/embed.py, docs/ip.md); the watermark then lives in the
tuner's own parameters (LoRA's A and B), and trigger sentences are told apart from real
ones by the attention layers.
"""

from __future__ import annotations

import os
from dataclasses import replace

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.seeding import derive_seed
from fedfm.core.types import State
from fedfm.ip.embed import HEAD_PATTERNS, EmbedSettings, embed
from fedfm.ip.preserve import PreserveParams, build_preserver, preserve_problems
from fedfm.ip.trigger import TriggerSpec, trigger_set

WAFFLE_TAG = 0xAFF1E


def secret(key: str | None, key_env: str | None, where: str) -> str:
    """The key given in the config, else the value of the environment variable ``key_env``."""
    if key is not None:
        return key
    value = os.environ.get(key_env or "", "")
    if not value:
        raise ValueError(f"server_steps {where}: environment variable {key_env} (key_env) is not set or empty")
    return value


class PatternFields(BaseModel):
    """The trigger kind, and the shape of pattern triggers (``trigger.py``); shared by
    ``waffle`` and ``client_watermark``."""

    model_config = ConfigDict(extra="forbid")
    trigger: Literal["random", "pattern"] = Field(
        "random",
        description="random: trigger_size independent random-token sentences; pattern: WAFFLEPattern adapted to text, "
        "`patterns` secret token patterns with a label each, on random fillers (classification only; "
        "verified by one majority vote per pattern)",
    )
    patterns: int = Field(64, ge=1, description="trigger: pattern only: secret patterns (the items verification counts)")
    pattern_tokens: int = Field(3, ge=1, description="trigger: pattern only: secret tokens per pattern, at key-drawn positions")
    fillers_per_pattern: int = Field(
        4, ge=1, description="trigger: pattern only: triggers per pattern, each with fresh random filler tokens")

    def trigger_spec(self, task: str, num_labels: int, size: int) -> TriggerSpec:
        return TriggerSpec(task, size, self.trigger_length, num_labels, self.continuation, self.trigger,
                           self.patterns, self.pattern_tokens, self.fillers_per_pattern)


class WaffleParams(PatternFields):
    key: str | None = Field(None, min_length=1, description="secret watermark key (ends up in config.yaml; see key_env)")
    key_env: str | None = Field(None, min_length=1, description="environment variable holding the secret key")
    trigger_size: int = Field(50, ge=1, description="number of trigger examples")
    trigger_length: int = Field(12, ge=1, description="random tokens per trigger sentence or prompt")
    continuation: int = Field(4, ge=1, description="causal LM only: fixed continuation tokens per prompt")
    threshold: float = Field(0.98, gt=0, le=1, description="stop once the watermark accuracy reaches this")
    max_steps: int = Field(100, ge=0, description="step budget per round")
    lr: float = Field(5e-3, gt=0, description="AdamW learning rate of the embedding")
    batch_size: int = Field(16, ge=1, description="trigger examples per step")
    rounds: Literal["every", "last"] = Field(
        "every",
        description="embed after every aggregation (the paper) or only after the last round's (the published model; "
        "with client_watermark's owner key every copy sent out is marked anyway)",
    )
    preserve: PreserveParams | None = Field(
        None, description="distillation on public text during the embedding (ip/preserve.py; not in the paper): {data: {source: ...}, weight}"
    )
    freeze: list[str] = Field(
        default_factory=lambda: list(HEAD_PATTERNS),
        description="fnmatch patterns of trainable names the step leaves unchanged (default: the task head; see ip/embed.py)",
    )

    @model_validator(mode="after")
    def _one_key(self):
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give exactly one of key or key_env")
        return self

    def secret(self) -> str:
        return secret(self.key, self.key_env, "waffle")

    def spec(self, task: str, num_labels: int) -> TriggerSpec:
        return self.trigger_spec(task, num_labels, self.trigger_size)

    def settings(self) -> EmbedSettings:
        return EmbedSettings(self.threshold, self.max_steps, self.lr, self.batch_size, tuple(self.freeze))


class Waffle:
    name = "waffle"
    stage = "model"
    client_state = None  # every client gets the global State

    def __init__(self, params: WaffleParams):
        self.params = params
        self._key = params.secret()  # a missing key_env variable stops the run before any training
        self._triggers: list[dict] | None = None
        self._preserver = None

    def triggers(self, wb) -> list[dict]:
        if self._triggers is None:
            spec = self.params.spec(wb.exp.model.task, wb.exp.model.num_labels)
            self._triggers = trigger_set(self._key, spec, wb.tokenizer)
        return self._triggers

    def __call__(self, model_state: State, ctx, state: State):
        wb = ctx.workbench
        if wb is None:
            raise ValueError("server step waffle needs the base model (RoundContext.workbench), and this round has none")
        if self.params.rounds == "last" and ctx.round < wb.exp.rounds:
            return model_state, state, {"steps": 0, "seconds": 0.0}
        if self._preserver is None and self.params.preserve is not None:
            self._preserver = build_preserver(self.params.preserve, wb.task, wb.tokenizer, derive_seed(ctx.seed, WAFFLE_TAG),
                                                self.params.trigger_length, run=wb.exp)
        result = embed(
            wb.model,
            wb.task,
            wb.exp.model.task,
            wb.tokenizer,
            wb.full_state(model_state),
            self.triggers(wb),
            replace(self.params.settings(), preserve=self._preserver),
            seed=derive_seed(ctx.seed, ctx.round, WAFFLE_TAG),
            train_names=set(model_state),
        )
        shared = {k: result.state[k].to(v.dtype) for k, v in model_state.items()}
        metrics = {"wm_accuracy": result.accuracy, "steps": result.steps, "seconds": round(result.seconds, 3)}
        if result.preserve_kl is not None:
            metrics["preserve_kl"] = result.preserve_kl
        return shared, state, metrics


register_server_step("waffle", Waffle, WaffleParams)

__all__ = ["Waffle", "WaffleParams"]

DEFAULT_ALPHA = 1e-6  # the p-value below which `fedfm watermark verify` calls a model verified


def waffle_config_problems(exp) -> list[str]:
    """Waffle settings that cannot give a verifiable watermark, with the numbers."""
    import math

    from fedfm.ip.trigger import KINDS

    from fedfm.aggregators.server_part import issues_instructions

    problems = []
    for i, spec in enumerate(exp.server_steps):
        if not isinstance(spec, dict) or spec.get("name") not in ("waffle", "client_watermark"):
            continue
        where = f"server_steps[{i}] ({spec['name']})"
        problems += preserve_problems(spec.get("preserve"), exp, f"server_steps[{i}]")
        if spec["name"] == "client_watermark" and issues_instructions(exp.learner.name):
            problems.append(f"{where}: learner '{exp.learner.name}' sends each client a State of its own shape; "
                            "client-unique copies need the global State's shapes")
        if exp.model.task not in KINDS:
            problems.append(f"{where}: trigger sets exist for tasks {KINDS}, not model.task '{exp.model.task}'")
            continue
        waffle = next((s for s in exp.server_steps if isinstance(s, dict) and s.get("name") == "waffle"), None)
        owner_size, waffle_size = spec.get("owner_trigger_size"), (waffle or {}).get("trigger_size", 50)
        if spec["name"] == "client_watermark" and waffle is not None and owner_size is not None and owner_size != waffle_size:
            problems.append(f"{where}: owner_trigger_size {owner_size} differs from the waffle step's trigger_size "
                            f"{waffle_size}; the copies train the waffle step's trigger set (omit owner_trigger_size)")
        pattern = spec.get("trigger", "random") == "pattern"
        if pattern and exp.model.task != "text_classification":
            problems.append(f"{where}: trigger: pattern is implemented for text_classification only, "
                            f"not model.task '{exp.model.task}'; use trigger: random")
            continue
        field = "patterns" if pattern else "trigger_size"
        size = spec.get(field, WaffleParams.model_fields[field].default)
        length = spec.get("trigger_length", WaffleParams.model_fields["trigger_length"].default)
        tokens = spec.get("pattern_tokens", WaffleParams.model_fields["pattern_tokens"].default)
        if pattern and isinstance(tokens, int) and isinstance(length, int) and tokens >= length:
            problems.append(f"{where}: pattern_tokens {tokens} must be < trigger_length {length} "
                            "(the other positions hold the random fillers)")
        labels = exp.model.num_labels
        if exp.model.task == "text_classification" and labels >= 2 and isinstance(size, int) and size >= 1:
            best = (1.0 / labels) ** size
            if best >= DEFAULT_ALPHA:
                need = math.floor(math.log(DEFAULT_ALPHA) / math.log(1.0 / labels)) + 1
                problems.append(
                    f"{where}: {field} {size} with {labels} labels: even {size}/{size} right has p = {best:.1e}, "
                    f"never below verify's alpha {DEFAULT_ALPHA:g}; use {field} >= {need}"
                )
    return problems
