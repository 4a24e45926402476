"""``client_watermark``: every client receives its own watermarked copy of the global model.

DUW-inspired (Shuyang Yu, Junyuan Hong, Yi Zeng, Fei Wang, Ruoxi Jia and Jiayu Zhou 2023,
"Who Leaked the Model? Tracking IP Infringers in Accountable Federated Learning", NeurIPS
2023 Workshop on Regulatable ML): the server gives each client a copy that
carries a key of its own, so that a leaked copy names the client it came from
(``unique.trace``, ``fedfm watermark trace``). DUW embeds the keys with a decoder trained
on the server; that decoder is NOT implemented. Here a client's copy is the global model
fine-tuned on the client's own trigger set (key ``trigger.client_key(master, cid)``), with
the same embedding as WAFFLE (``embed.py``), optionally together with the owner's WAFFLE
trigger set (``owner_key``/``owner_key_env``) so the copy keeps the federation's watermark.

How it reaches the clients: this is a server step at stage ``model``. After each
aggregation (and after ``waffle``, if listed before it) it embeds every client's key into
the new global State and keeps, per client, the *offset* ``copy - global`` in its own
server-state group (``step.<i>.client_watermark``, entries ``<cid>/<name>``; checkpointed,
so a resumed run sends the same copies). Its ``client_state(cid, model, own)`` hook gives
``global + offset``: ``FedAlgorithm.configure`` asks every step that has that hook for each
client's State (``aggregators/pipeline.Pipeline.per_client``). The next round's embedding
starts from the new global plus the client's previous offset, so after the first round it
usually needs few steps. ``preserve`` (off by default) adds waffle's distillation on
public text to every copy's embedding (``ip/preserve.py``). The global model itself (evaluated, checkpointed, final.safetensors)
carries no client key; a client's update is a delta against the copy it received, so its
key does not flow back into the aggregate.

Limits, stated: round 1's broadcast is the initial State (before any federated training)
and goes out unmarked, because no aggregation has run yet; every client's copy is rebuilt
each round (``federation.clients`` embeddings, not only the sampled clients'), and the
server state holds ``federation.clients`` offsets of the shared State's size. Per-client
shapes (HetLoRA, FlexLoRA, FedRA) are refused at config time.
"""

from __future__ import annotations

from typing import Literal

import time
from dataclasses import replace

from pydantic import Field, model_validator

from fedfm.aggregators.pipeline import register_server_step
from fedfm.core.seeding import derive_seed
from fedfm.core.types import State
from fedfm.ip.embed import EmbedSettings, embed
from fedfm.ip.preserve import PreserveParams, build_preserver
from fedfm.ip.trigger import TriggerSpec, client_key, trigger_set
from fedfm.ip.waffle import PatternFields, WaffleParams, secret

COPY_TAG = 0xC0B1


class ClientWatermarkParams(PatternFields):
    key: str | None = Field(None, min_length=1, description="secret master key of the client keys (ends up in config.yaml; see key_env)")
    key_env: str | None = Field(None, min_length=1, description="environment variable holding the master key")
    owner_key: str | None = Field(None, min_length=1, description="the WAFFLE key, trained into every copy too (keeps the owner's watermark)")
    owner_key_env: str | None = Field(None, min_length=1, description="environment variable holding the WAFFLE key")
    trigger_size: int = Field(50, ge=1, description="trigger examples per client key")
    owner_trigger_size: int | None = Field(None, ge=1, description="trigger examples of the owner's key when the run has no waffle step (default: trigger_size); "
        "with a waffle step the copies train that step's trigger set (kind, size, patterns) and this must match or be omitted")
    trigger_length: int = Field(12, ge=1, description="random tokens per trigger sentence or prompt")
    continuation: int = Field(4, ge=1, description="causal LM only: fixed continuation tokens per prompt")
    threshold: float = Field(0.98, gt=0, le=1, description="stop once the copy answers this share of its own triggers "
                             "and this share of the owner's (each set on its own)")
    max_steps: int = Field(100, ge=0, description="step budget per client per round")
    lr: float = Field(5e-3, gt=0, description="AdamW learning rate of the embedding")
    batch_size: int = Field(16, ge=1, description="trigger examples per step")
    rounds: Literal["every", "last"] = Field(
        "every", description="build the copies after every aggregation (each round's broadcast is a copy) or only after "
        "the last round's (the federation trains as without the step; `fedfm watermark copy RUN --client N` writes "
        "client N's final copy)")
    preserve: PreserveParams | None = Field(
        None, description="distillation on public text during each copy's embedding (ip/preserve.py): {data: {source: ...}, weight}"
    )
    freeze: list[str] = Field(
        default_factory=lambda: list(WaffleParams.model_fields["freeze"].default_factory()),
        description="fnmatch patterns of trainable names left unchanged (default: the task head; see ip/embed.py)",
    )

    @model_validator(mode="after")
    def _keys(self):
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give exactly one of key or key_env")
        if self.owner_key is not None and self.owner_key_env is not None:
            raise ValueError("give at most one of owner_key or owner_key_env")
        return self

    def spec(self, task: str, num_labels: int) -> TriggerSpec:
        """The client keys' trigger spec."""
        return self.trigger_spec(task, num_labels, self.trigger_size)

    def settings(self) -> EmbedSettings:
        return EmbedSettings(self.threshold, self.max_steps, self.lr, self.batch_size, tuple(self.freeze))


def owner_spec(params: ClientWatermarkParams, exp) -> TriggerSpec:
    """The owner's trigger spec trained into every copy: the run's ``waffle`` step's (its
    trigger kind, patterns, size), else the copies' own with ``owner_trigger_size``."""
    waffle = next((s for s in exp.server_steps if isinstance(s, dict) and s.get("name") == "waffle"), None)
    if waffle is not None:
        return WaffleParams(**{k: v for k, v in waffle.items() if k != "name"}).spec(exp.model.task, exp.model.num_labels)
    return replace(params.spec(exp.model.task, exp.model.num_labels), size=params.owner_trigger_size or params.trigger_size)


def offset_key(cid: int, name: str) -> str:
    return f"{cid}/{name}"


def copy_of(cid: int, model: State, offsets: State) -> State:
    """Client ``cid``'s copy: ``model + offset`` where the step holds an offset, else ``model``."""
    if offset_key(cid, next(iter(model))) not in offsets:
        return model
    return {k: v + offsets[offset_key(cid, k)].to(v.dtype) for k, v in model.items()}


class ClientWatermark:
    name = "client_watermark"
    stage = "model"

    def __init__(self, params: ClientWatermarkParams):
        self.params = params
        # the keys now, so that a missing key_env variable stops the run before any training
        self._master = secret(params.key, params.key_env, "client_watermark")
        owner = params.owner_key is not None or params.owner_key_env is not None
        self._owner = secret(params.owner_key, params.owner_key_env, "client_watermark owner") if owner else None
        self._triggers: dict[int, list[dict]] = {}
        self._parts: dict[int, tuple[int, ...]] = {}
        self._preserver = None

    def triggers(self, wb, cid: int) -> list[dict]:
        if cid not in self._triggers:
            p = self.params
            spec = p.spec(wb.exp.model.task, wb.exp.model.num_labels)
            own = trigger_set(client_key(self._master, cid), spec, wb.tokenizer)
            extra = trigger_set(self._owner, owner_spec(p, wb.exp), wb.tokenizer) if self._owner is not None else []
            self._triggers[cid] = own + extra
            self._parts[cid] = (len(own), len(extra)) if extra else ()  # the threshold holds for each set
        return self._triggers[cid]

    def __call__(self, model_state: State, ctx, state: State):
        wb = ctx.workbench
        if wb is None:
            raise ValueError("server step client_watermark needs the base model (RoundContext.workbench), and this round has none")
        if self.params.rounds == "last" and ctx.round < wb.exp.rounds:
            return model_state, state, {"steps": 0, "seconds": 0.0}
        start = time.perf_counter()
        offsets: State = {}
        accuracies, steps, kls = [], 0, []
        if self._preserver is None and self.params.preserve is not None:
            self._preserver = build_preserver(self.params.preserve, wb.task, wb.tokenizer, derive_seed(ctx.seed, COPY_TAG),
                                                self.params.trigger_length, run=wb.exp)
        settings = replace(self.params.settings(), preserve=self._preserver)
        for cid in range(ctx.num_clients):
            result = embed(
                wb.model, wb.task, wb.exp.model.task, wb.tokenizer,
                wb.full_state(copy_of(cid, model_state, state)),
                self.triggers(wb, cid),
                replace(settings, parts=self._parts[cid]),
                seed=derive_seed(ctx.seed, ctx.round, cid, COPY_TAG),
                train_names=set(model_state),
            )
            for k, v in model_state.items():
                offsets[offset_key(cid, k)] = result.state[k].to(v.dtype) - v
            accuracies.append(result.accuracy)
            steps += result.steps
            if result.preserve_kl is not None:
                kls.append(result.preserve_kl)
        seconds = time.perf_counter() - start
        metrics = {
            "min_accuracy": min(accuracies),
            "mean_accuracy": sum(accuracies) / len(accuracies),
            "steps": steps,
            "seconds": round(seconds, 3),
            "seconds_per_client": round(seconds / max(ctx.num_clients, 1), 3),
        }
        if kls:
            metrics["preserve_kl_mean"] = sum(kls) / len(kls)
        return model_state, offsets, metrics

    def client_state(self, cid: int, model: State, own: State) -> State:
        """The State client ``cid`` is sent (``Pipeline.per_client``)."""
        return copy_of(cid, model, own)


register_server_step("client_watermark", ClientWatermark, ClientWatermarkParams)


def final_copy(run: "Path", cid: int) -> State:
    """Client ``cid``'s copy after a run's last round: the last checkpoint's global State plus
    the client's offset held by the ``client_watermark`` step (what ``fedfm watermark copy`` writes)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from fedfm.core.types import unflatten_groups

    rounds = sorted(Path(run, "checkpoints").glob("round-*"))
    if not rounds:
        raise FileNotFoundError(f"{run}: no checkpoints/round-* directory (a fedfm run directory with checkpoints)")
    last = rounds[-1]
    model = load_file(str(last / "state.safetensors"))
    groups = unflatten_groups(load_file(str(last / "algorithm.safetensors"))) if (last / "algorithm.safetensors").exists() else {}
    offsets = next((g for name, g in groups.items() if name.endswith("client_watermark")), None)
    if offsets is None:
        raise ValueError(f"{last}: no client_watermark offsets; the run has no client_watermark step")
    if offset_key(cid, next(iter(model))) not in offsets:
        held = sorted({int(k.split("/", 1)[0]) for k in offsets})
        raise KeyError(f"{last}: no copy for client {cid}; the step holds clients {held[0]}..{held[-1]}" if held
                       else f"{last}: the client_watermark step holds no copy yet")
    return copy_of(cid, model, offsets)
