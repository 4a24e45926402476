"""The experiment schema: pydantic models and YAML loading (dotted overrides: ``overrides.py``).

Every section is strict (an unknown key is an error). Sections that name a registered
component (``peft.method``, ``aggregator.rule``, ``federation.partitioner.name``,
``learner.name``, codec stages) carry the component's own parameters, validated against
the schema the component registered, so a typo fails before any data or model loads and
the message names the key, e.g. ``peft.r: Input should be greater than 0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedfm.overrides import ConfigError, apply_overrides, blame, format_errors, parse_override

__all__ = ["ConfigError", "Experiment", "apply_overrides", "from_dict", "load_config", "parse_override"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # inf/NaN: refused by field


class Spec(BaseModel):
    """A component reference: one name key plus the component's own parameters."""

    model_config = ConfigDict(extra="allow")

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ObjectiveSpec(Spec):
    """``model.objective: {name: dpo, beta: 0.1}``: a training objective of the task other
    than its default (registered in ``fedfm.tasks.objectives``)."""

    name: str


class ModelConfig(Strict):
    task: str = "text_classification"
    # The task's own parameters, validated against the schema it registered
    # (``register_task(name, cls, params)``), e.g. lm_classification's template and label words.
    task_options: dict[str, Any] = Field(default_factory=dict)
    package: str | None = None
    path: str | None = None
    # None: inferred from the data's labels before the model loads (fedfm.data.labels);
    # a number is checked against them.
    num_labels: int | None = Field(None, ge=1)
    init: Literal["pretrained", "random"] = "pretrained"
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    objective: ObjectiveSpec | None = None
    # A previous run's final State (its run folder or a .safetensors file) copied into the
    # base model before the tuner is applied: DAPT then fine-tuning (fedfm.personalize.init_from).
    init_from: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if self.package is None and self.path is None:
            raise ValueError("give exactly one of model.package or model.path (neither is set)")
        if self.package is not None and self.path is not None:
            raise ValueError(
                f"give exactly one of model.package or model.path; both are set (package "
                f"'{self.package}', path '{self.path}'): remove one, or pass -o model.package=null"
            )
        return self


class DataConfig(Strict):
    source: str = "rotten_tomatoes"
    path: str | None = None
    format: Literal["csv", "jsonl", "parquet"] | None = None
    encoding: str = "utf-8"  # of a CSV / JSONL file, e.g. latin-1 or cp1252
    text_column: str = "text"
    label_column: str | None = "label"
    group_column: str | None = None
    labels: list[str] | None = None
    max_length: int = Field(64, ge=4)
    limit: int | None = Field(None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown text encoding '{value}' (e.g. utf-8, latin-1, cp1252)") from None
        return value


class PartitionerSpec(Spec):
    name: str = "iid"


class RoleSpec(Strict):
    """A group of clients with a role: ``{name: attacker, fraction: 0.2, middleware:
    [{name: sign_flip}], profile: {rank: 4}}``. Members are drawn with the seeded
    generator (``runtime/roles.py``); give exactly one of ``fraction``, ``count``, ``cids``."""

    name: str = Field(..., min_length=1)
    fraction: float | None = Field(None, gt=0, le=1)
    count: int | None = Field(None, ge=1)
    cids: list[int] | None = None
    profile: dict[str, Any] = Field(default_factory=dict)
    middleware: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_size(self):
        given = [k for k in ("fraction", "count", "cids") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"role '{self.name}': give exactly one of fraction, count, cids (got {given or 'none'})")
        if self.name == "default":
            raise ValueError("role name 'default' is reserved for clients without a role")
        return self


class FederationConfig(Strict):
    clients: int = Field(8, ge=1)
    partitioner: PartitionerSpec = Field(default_factory=PartitionerSpec)
    examples_per_client: int | None = Field(None, ge=1)
    test_examples: int = Field(1000, ge=1)
    clients_per_round: int | None = Field(None, ge=1)
    # Sampling and quorum (runtime/sampling.py): a fraction is ceil(fraction * clients).
    fraction: float | None = Field(None, gt=0, le=1)
    sampling: Literal["uniform", "weighted"] = "uniform"
    min_clients: int = Field(1, ge=1)
    on_too_few: Literal["retry", "skip"] = "retry"
    max_retries: int = Field(3, ge=0)
    # Client roles and profiles (runtime/roles.py) and each client's own held-out slice.
    roles: list[RoleSpec] = Field(default_factory=list)
    client_holdout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _sampling(self):
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("give at most one of clients_per_round and fraction")
        if self.clients_per_round is not None and self.clients_per_round > self.clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds clients ({self.clients})"
            )
        if self.min_clients > self.clients:
            raise ValueError(f"min_clients ({self.min_clients}) exceeds clients ({self.clients})")
        from fedfm.runtime.sampling import clients_per_round

        k = clients_per_round(self, self.clients)
        if self.min_clients > k:
            how = (f"clients_per_round {self.clients_per_round}" if self.clients_per_round is not None
                   else f"ceil(fraction {self.fraction} x {self.clients} clients)")
            raise ValueError(f"min_clients ({self.min_clients}) exceeds the {k} clients sampled per round ({how}): "
                             f"no round could reach min_clients, so every round would be skipped (after its retries)")
        names = [r.name for r in self.roles]
        if len(set(names)) != len(names):
            raise ValueError(f"roles: names must be unique, got {names}")
        for r in self.roles:
            bad = [c for c in r.cids or [] if not 0 <= c < self.clients]
            if bad:
                raise ValueError(f"role '{r.name}': cids {bad} outside 0..{self.clients - 1}")
        return self


class PeftSpec(Spec):
    method: str = "lora"
    # Trainable names that stay on the client (fnmatch patterns, e.g. "classifier.*").
    local: list[str] = Field(default_factory=list)


class LearnerSpec(Spec):
    name: str = "local"


class AggregatorSpec(Spec):
    rule: str = "fedavg"


class ServerOptimizerSpec(Spec):
    """``server_optimizer: {name: fedadam, lr: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3}``;
    the default ``sgd`` with lr 1.0 applies the aggregated delta as is (FedAvg)."""

    name: str = "sgd"


class TrainConfig(Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, allow_inf_nan=False)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    epochs: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    # Speed switches (docs/speed.md): bf16 autocast of the forward pass (changes the
    # float math), torch.compile of the model (same math up to kernel fusion), and
    # length-bucketed batches (changes which examples share a batch), padding-free BERT
    # training (same math and dropout masks; weight-gradient sums round differently).
    autocast: Literal["bf16"] | None = Field(None, description="bf16: run forward passes under torch.autocast(bfloat16)")
    compile: bool = Field(False, description="torch.compile the model for training; compile time is logged")
    bucket_by_length: bool = Field(False, description="batch examples of similar length together (changes batch composition)")
    unpad: bool = Field(False, description="BERT encoders: compute on real tokens only (and, for sequence classification, the last layer on the first token only); same math and dropout masks, float rounding differs")


class CodecsConfig(Strict):
    up: list[dict[str, Any]] = Field(default_factory=list)
    down: list[dict[str, Any]] = Field(default_factory=list)


class EvalConfig(Strict):
    batch_size: int = Field(64, ge=1)
    every: int = Field(1, ge=1)
    # Per-client evaluation on each client's own held-out slice (federation.client_holdout),
    # run on the clients through the transport: none, the round's sampled clients, or all.
    clients: Literal["none", "sampled", "all"] = "none"
    sort_by_length: bool = Field(True, description="evaluation batches of similar length (less padding); metrics are order-free sums")
    unpad: bool = Field(False, description="BERT encoders: evaluate on real tokens only, and the last layer on the first token only when the head reads nothing else (learners/unpad.py); same math, float rounding differs")


class StragglerConfig(Strict):
    """Simulated client speeds: a client's round takes steps * seconds_per_step / speed."""

    profile: Literal["constant", "uniform", "lognormal", "tiers"] = "constant"
    low: float = Field(0.25, gt=0)
    high: float = Field(1.0, gt=0)
    sigma: float = Field(0.5, gt=0)
    speeds: list[float] = Field(default_factory=lambda: [1.0, 0.5, 0.1])
    weights: list[float] | None = None
    seconds_per_step: float = Field(1.0, gt=0)
    deadline_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _profile(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) exceeds high ({self.high})")
        if any(s <= 0 for s in self.speeds):
            raise ValueError("speeds must all be > 0")
        if self.weights is not None and (
            len(self.weights) != len(self.speeds) or any(w < 0 for w in self.weights) or sum(self.weights) <= 0
        ):
            raise ValueError("weights must be non-negative, one per entry of speeds, with a positive sum")
        return self


class FaultsConfig(Strict):
    """Simulated faults (runtime/faults.py); real client exceptions are always caught."""

    dropout: float = Field(0.0, ge=0, le=1)
    stragglers: StragglerConfig = Field(default_factory=StragglerConfig)


class ServerConfig(Strict):
    """Server-side update validation (runtime/validate.py) and checkpointing."""

    max_update_bytes: int | None = Field(None, ge=1)
    check_fingerprint: bool = True
    checkpoint: bool = True
    keep_checkpoints: int = Field(1, ge=1)


class FlowerConfig(Strict):
    """``runtime.flower``: how the Flower backend runs (see docs/distributed.md)."""

    mode: Literal["simulation", "deployment"] = "simulation"
    num_cpus: float = Field(1.0, gt=0)  # per virtual client (simulation)
    num_gpus: float = Field(0.0, ge=0)  # per virtual client (simulation)
    superlink: str | None = None  # deployment: a connection name of the Flower Configuration
    app_dir: str | None = None  # deployment: the Flower app to submit (default: the shipped one)
    wait_for_nodes_s: float = Field(300.0, gt=0)  # deployment: how long to wait for SuperNodes
    round_timeout_s: float = Field(3600.0, gt=0)  # replies not back by then are dropped
    keep_model: bool = True  # cache the loaded base model in a long-lived ClientApp process
    verbose: bool = False
    nodes: dict[int, str] | None = Field(
        None,
        description="deployment: fedfm client id -> that SuperNode's public key (an OpenSSH EC key file, "
        "or the key line itself); a node is admitted only for the client its key is bound to (runtime/flower/node_keys.py)",
    )


class RuntimeConfig(Strict):
    backend: Literal["local", "flower"] = "local"
    threads: int | None = Field(None, ge=1)
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where the base model trains and evaluates (auto: cuda if available)")
    # The local backend's transport (runtime/concurrent.py): one client at a time, or
    # several at once in worker processes forked after the base model is loaded.
    transport: Literal["sequential", "processes", "batched"] = Field(
        "sequential", description="sequential | processes (worker processes) | batched (several clients' LoRA in one forward pass)")
    workers: int | None = Field(None, ge=1, description="worker processes (processes transport); default: CPU cores // threads_per_worker")
    threads_per_worker: int = Field(1, ge=1, description="torch threads in each worker process (1 under GNU OpenMP, where a forked worker hangs in a multi-threaded op)")
    parent_trains: bool = Field(False, description="processes transport: the run's own process trains clients too "
                                "(one process fewer for the same concurrency; default workers: cores // threads_per_worker - 1)")
    batch_clients: int = Field(4, ge=1, description="clients trained together in one forward pass (batched transport)")
    batch_kernel: Literal["auto", "segments", "stacked"] = Field(
        "auto", description="batched transport: how the K clients' LoRA terms are computed: segments (one pair of "
        "matmuls per client), stacked (two bmm per layer for all K when their batches are of one size), auto "
        "(stacked on CUDA, segments on the CPU)")
    progress: bool = True
    flower: FlowerConfig = Field(default_factory=FlowerConfig)


class TensorBoardSink(Strict):
    dir: str | None = Field(None, description="event file folder; default: <run dir>/tensorboard")


class MlflowSink(Strict):
    uri: str | None = Field(None, description="tracking URI; default: sqlite:///<run dir>/mlflow.db (an SQLite store in the run folder)")
    experiment: str | None = Field(None, description="MLflow experiment name; default: the run's name")


class TrackingConfig(Strict):
    """Sinks beside metrics.jsonl (``fedfm.tracking``): each gets every numeric field of
    each metrics row and the resolved config as parameters."""

    tensorboard: TensorBoardSink | None = None
    mlflow: MlflowSink | None = None


class Experiment(Strict):
    name: str = "experiment"
    seed: int = 0
    rounds: int = Field(3, ge=1)
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    peft: PeftSpec = Field(default_factory=PeftSpec)
    learner: LearnerSpec = Field(default_factory=LearnerSpec)
    train: TrainConfig = Field(default_factory=TrainConfig)
    codecs: CodecsConfig = Field(default_factory=CodecsConfig)
    aggregator: AggregatorSpec = Field(default_factory=AggregatorSpec)
    server_optimizer: ServerOptimizerSpec = Field(default_factory=ServerOptimizerSpec)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    server_steps: list[dict[str, Any]] = Field(default_factory=list)
    plugins: list[str] = Field(default_factory=list)  # user files or modules that register components
    exchanges: list[dict[str, Any]] = Field(default_factory=list)  # extra message phases per round

    @model_validator(mode="before")
    @classmethod
    def _attack_section(cls, data):
        # ``attack: {name: ..., fraction: 0.2}`` is sugar for a client role (attacks/sugar.py).
        if isinstance(data, dict) and "attack" in data:
            from fedfm.attacks.sugar import expand_attack

            data = expand_attack(data)
        return data
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _client_eval(self):
        if self.eval.clients != "none" and self.federation.client_holdout <= 0:
            raise ValueError("eval.clients needs federation.client_holdout > 0 (each client's own held-out slice)")
        return self

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# -- loading -----------------------------------------------------------------------


def from_dict(raw: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None,
              components: bool = True) -> Experiment:
    """Validate a raw mapping (plus overrides) into an Experiment, components included;
    ``components=False`` skips the components' and cross-field checks: for the recorded
    config of a finished run (``ip/loading.py``), which today's stricter checks may refuse."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping")
    overrides = overrides or []
    raw = apply_overrides(raw, overrides)
    try:
        exp = Experiment(**raw)
    except ValidationError as exc:
        raise ConfigError(blame(format_errors(exc, Experiment), overrides, source)) from None
    from fedfm.components import validate_components
    from fedfm.plugins import PluginError, load_plugins, plugin_path

    base = Path(source).parent if Path(source).is_file() else None
    try:
        load_plugins(exp.plugins, base)
        exp.plugins = [str(plugin_path(e, base)) if e.endswith(".py") else e for e in exp.plugins]
    except PluginError as exc:
        raise ConfigError(f"invalid config {source}:\n  {exc}") from None
    if not components:
        return exp
    try:
        validate_components(exp, source)
    except ConfigError as exc:
        lines = str(exc).split("\n")[1:]  # below the "invalid config SOURCE:" header
        raise ConfigError(blame(lines, overrides, source)) from None
    return exp


def load_config(path: str | Path, overrides: list[str] | None = None, components: bool = True) -> Experiment:
    from fedfm.config_file import read_yaml

    return from_dict(read_yaml(path), str(path), overrides, components)
