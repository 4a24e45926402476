"""K global models and clients that pick one: IFCA (Ghosh et al. 2020, "An Efficient
Framework for Clustered Federated Learning", Algorithm 1, model-averaging variant), and
clusters given by the data (FedLFC, Guo et al. 2024b, "FedLFC: Towards Efficient
Federated Multilingual Modeling with LoRA-based Language Family Clustering": one LoRA per
language family).

Server state: cluster 0's shared State is ``model`` (what the global evaluation and
``fedfm report`` see); clusters 1..K-1 are the groups ``model.1`` ... ``model.<K-1>``,
checkpointed with the rest and broadcast beside the State as groups of the same names
(so the downlink carries K models, as in IFCA). Cluster j >= 1 starts as ``model`` plus
Gaussian noise of std ``init_std`` (seeded by ``init_seed``), so the K models differ.

Client (``learner: {name: ifca, k: K}``):

- ``assign: loss`` (IFCA): evaluate each of the K models on up to ``assign_examples`` of
  its training examples and pick the lowest loss (``clustering.ifca_choice``);
- ``assign: profile`` (clusters given by the data, FedLFC-style): take the cluster from its
  profile key ``profile_key`` (``federation.roles: [{name: romance, cids: [...],
  profile: {cluster: 1}}]``; ``clusters_from_column`` builds these roles from a data
  column);

then train that model with the plain local loop and send its delta (under the State's
names) plus ``ifca/weight`` (K,): its example count at its cluster, zero elsewhere. The
chosen cluster also travels in the update's metadata (``cluster``), where the
``cluster_report`` server step reads it to keep and report the assignments.

Server (``combine``): cluster j's model moves by the example-weighted mean of the deltas
of the clients that chose j (unchanged when none did); cluster 0's mean is handed to the
server optimizer as the pseudo-gradient, the others are applied directly, so IFCA is
refused at config time with any rule but ``fedavg`` or a server optimizer other than
``sgd`` with lr 1 (the clusters would then be treated differently). The cluster weight
travels inside the payload, and the server pipeline sees cluster 0 only, so these are
refused too (``checks.ifca_payload_problems``): uplink codecs; server steps at stage
``delta`` or ``model`` (central ``dp_noise``, ``weak_dp``, watermarking: cluster 0 only;
central DP would leave clusters 1..K-1 un-noised while reporting epsilon); server steps
at stage ``updates`` other than those that pass the payload on as it is
(``checks.PAYLOAD_KEEPING_STEPS``: ``cluster_report``, ``sim_clock``, ...), since
``dp_clip``, ``clip_updates``, ``norm_bound`` and ``centered_clip`` would count the weight
in the norm (a delta of norm 0.1 with weight [0, 200] clipped to 0.5 is scaled by 1/400)
and ALIE / IPM would craft it; client middleware that changes the payload (``sign_flip``,
``scaling``, ``gaussian_noise``, ``dp_client_noise``). Moving the weight out of the
payload (into the update's metadata) would lift the ``updates``-stage refusals.

Also refused at config time: ``k`` above ``federation.clients``; with ``assign: profile``,
a client whose profile lacks the key or holds a value outside 0..K-1
(``profile_clusters_problem``; a client in no role has an empty profile).

Not implemented: IFCA's gradient-averaging variant; weight sharing between the K models
(IFCA's shared layers; with ``peft.local`` a client's local part is the same whichever
model it picks). Per-client evaluation (``eval.clients``) sends every client the State of
cluster 0, not its own cluster's: ``cluster_eval.py`` evaluates each client with its
cluster's model instead (a core change to do it in the loop is in docs/adaptability.md).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedfm.aggregators.server_part import ServerPartBase, register_server_part
from fedfm.core.profile_keys import profile_key_field
from fedfm.core.protocols import RoundContext
from fedfm.core.types import MODEL, Instruction, ServerState, State, Update
from fedfm.learners.base import LocalContext, register_learner
from fedfm.learners.local import delta_update
from fedfm.learners.loop import train_loop
from fedfm.peft.state import set_state
from fedfm.personalize.clustering import ifca_choice, majority

WEIGHT = "ifca/weight"
META = "cluster"


def group_name(j: int) -> str:
    """Server-state (and broadcast) group of cluster j; cluster 0 is ``model``."""
    return MODEL if j == 0 else f"{MODEL}.{j}"


class IFCAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(2, ge=1, description="number of cluster models K")
    assign: Literal["loss", "profile"] = Field("loss", description="loss: IFCA's lowest-loss choice; profile: given by profile_key")
    profile_key: str = profile_key_field("cluster", "profile key holding the cluster index (assign: profile)")
    assign_examples: int = Field(64, ge=1, description="training examples used to compare the K losses")
    init_std: float = Field(0.01, ge=0, description="std of the noise that makes clusters 1..K-1 differ at start")
    init_seed: int = Field(0, description="seed of that noise")


def cluster_models(inst: Instruction, k: int) -> list[State]:
    """The K candidate States of a client: cluster j's shared part over the received State."""
    models = [inst.state]
    for j in range(1, k):
        group = group_name(j)
        if group not in inst.broadcast:
            raise ValueError(f"ifca: the instruction for client {inst.cid} lacks cluster model '{group}'")
        models.append({**inst.state, **inst.broadcast[group]})
    return models


def profile_cluster(profile: dict, key: str, k: int, cid: int) -> int:
    if key not in profile:
        raise ValueError(f"ifca (assign: profile): client {cid} has no profile key '{key}' (set it in federation.roles)")
    j = int(profile[key])
    if not 0 <= j < k:
        raise ValueError(f"ifca: client {cid} has {key}={j}, outside 0..{k - 1} (learner.k)")
    return j


class IFCALearner:
    def __init__(self, params: IFCAParams):
        self.p = params

    def losses(self, models: Sequence[State], ctx: LocalContext) -> list[float]:
        items = ctx.examples[: self.p.assign_examples]
        bs = ctx.train.batch_size
        batches = [ctx.task.collate(items[i : i + bs], ctx.tokenizer) for i in range(0, len(items), bs)]
        out = []
        for state in models:
            set_state(ctx.model, state)
            ctx.model.eval()
            out.append(float(ctx.task.evaluate(ctx.model, batches)["loss"]))
        return out

    def local_update(self, instruction: Instruction, ctx: LocalContext) -> Update:
        models = cluster_models(instruction, self.p.k)
        if self.p.assign == "profile":
            j, losses = profile_cluster(ctx.profile, self.p.profile_key, self.p.k, ctx.cid), None
        else:
            losses = self.losses(models, ctx)
            j = ifca_choice(losses)
        chosen = Instruction(instruction.round, instruction.cid, models[j], instruction.config, instruction.broadcast)
        set_state(ctx.model, chosen.state)
        metrics = train_loop(ctx)
        update = delta_update(chosen, ctx, metrics)
        weight = torch.zeros(self.p.k)
        weight[j] = float(update.num_examples)
        update.payload = {**update.payload, WEIGHT: weight}
        update.meta = {**update.meta, META: str(j)}
        update.metrics = {**update.metrics, "cluster": float(j)}
        if losses is not None:
            update.metrics.update({f"cluster_loss.{i}": v for i, v in enumerate(losses)})
        return update


def cluster_means(payloads: Sequence[State], names: Sequence[str], k: int) -> list[State | None]:
    """Example-weighted mean delta of each cluster (None for a cluster no client chose)."""
    out: list[State | None] = []
    for j in range(k):
        w = [float(p[WEIGHT][j]) for p in payloads]
        total = sum(w)
        if total <= 0:
            out.append(None)
            continue
        out.append({n: sum(wi * p[n] for wi, p in zip(w, payloads) if wi > 0) / total for n in names})
    return out


def check_weights(payloads: Sequence[State], k: int) -> None:
    for i, p in enumerate(payloads):
        w = p[WEIGHT]
        if int((w > 0).sum()) != 1 or bool((w < 0).any()):
            raise ValueError(f"ifca: update {i} has {WEIGHT} {w.tolist()}; expected one positive entry of {k}")


class IFCAServer(ServerPartBase):
    def __init__(self, params: IFCAParams, num_clients: int):
        self.p = params
        self.broadcast_groups = tuple(group_name(j) for j in range(1, params.k))

    def init(self, model: State) -> ServerState:
        gen = torch.Generator().manual_seed(self.p.init_seed)
        out: ServerState = {}
        for j in range(1, self.p.k):
            out[group_name(j)] = {
                n: t + self.p.init_std * torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in sorted(model.items())
            }
        return out

    def payload_spec(self, shared: State) -> State:
        return {**shared, WEIGHT: torch.zeros(self.p.k)}

    def combine(self, server_state: ServerState, payloads: Sequence[State], mean_delta: State, ctx: RoundContext):
        check_weights(payloads, self.p.k)
        names = list(server_state[MODEL])
        means = cluster_means(payloads, names, self.p.k)
        groups: ServerState = {}
        for j in range(1, self.p.k):
            g, m = group_name(j), means[j]
            groups[g] = dict(server_state[g]) if m is None else {n: server_state[g][n] + m[n] for n in names}
        zero = {n: torch.zeros_like(t) for n, t in server_state[MODEL].items()}
        return groups, means[0] if means[0] is not None else zero


def clusters_from_column(frame, clients, column: str) -> dict[int, str]:
    """Each client's majority value of a data column (its known group)."""
    if column not in frame.columns:
        raise ValueError(f"data column '{column}' is not in the data (columns: {list(frame.columns)})")
    values = frame[column].to_numpy()
    return {c.cid: majority([values[i] for i in c.indices]) for c in clients if len(c.indices)}


def roles_for_clusters(groups: dict[int, str], key: str = "cluster") -> list[dict]:
    """``federation.roles`` entries giving each client the index of its group (sorted names)."""
    names = sorted(set(groups.values()), key=str)
    return [
        {"name": f"cluster_{j}", "cids": sorted(c for c, g in groups.items() if g == name), "profile": {key: j}}
        for j, name in enumerate(names)
    ]


def profile_clusters_problem(exp, key: str, k: int) -> str | None:
    """``assign: profile``: every client (a client in no role has role ``default`` and an
    empty profile) needs ``key``, an integer in 0..k-1; checked before training rather
    than failing that client in every round."""
    from fedfm.runtime.algorithm import client_profiles

    try:
        profiles = client_profiles(exp)
    except ValueError:
        return None  # the roles' own check reports it
    for cid, profile in sorted(profiles.items()):
        j = profile.get(key)
        if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < k:
            where = f"of role '{profile['role']}'" if profile["role"] != "default" else "in no role of federation.roles"
            has = f"profile.{key} {j!r}" if key in profile else f"no profile.{key}"
            return (f"learner ifca (assign: profile): client {cid} ({where}) has {has}; "
                    f"it needs an integer in 0..{k - 1} (learner.k={k})")
    return None


def ifca_config_problem(exp) -> str | None:
    if exp.learner.name != "ifca":
        return None
    from fedfm.personalize.checks import plain_mean_problem

    plain = plain_mean_problem(exp, "ifca")
    if plain is not None:
        return plain
    params = exp.learner.params()
    k, n = int(params.get("k", 2)), exp.federation.clients
    if k > n:
        return f"learner ifca: k={k} cluster models but only {n} clients (federation.clients): at most {n} can be trained"
    if params.get("assign") == "profile":
        problem = profile_clusters_problem(exp, params.get("profile_key", "cluster"), k)
        if problem is not None:
            return problem
    lossy = [s.get("name") for s in exp.codecs.up]
    if lossy:
        return f"learner ifca: uplink codecs {lossy} would also compress the cluster weight {WEIGHT}; not supported"
    return None


register_learner("ifca", IFCALearner, IFCAParams)
register_server_part("ifca", IFCAServer)

__all__ = ["IFCAParams", "cluster_means", "clusters_from_column", "roles_for_clusters"]
