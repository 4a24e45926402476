"""The multi-domain prompt and DAPT-chain rows of benchmarks/adaptability.py.

``--part multidomain`` (REDUCED_MD): FedAPT (``examples/adaptability/fedapt.yaml``) against
a single shared prompt (the same config, code and training with one key: ``num_domains=1``,
every client domain 0; the prompt is then ``prompt * (1 + key_0)``, one vector sequence
for every input, and the domain loss is 0). The politics corpus, 4 clients (0, 2: 2012
convention passages; 1, 3: 2016 debate statements), whole speakers per client, label the
party. Per-domain accuracy of the final global model on the test rows of each domain
(whole speakers no client owns) and on the clients' own held-out slices pooled per domain,
plus the share of test inputs whose adaptive-network argmax is their own domain's key. The
DiPrompT-inspired row runs ``examples/adaptability/diprompt.yaml`` on the same job (no
roles: latent domains) and reports the purity of its dynamic query on the test inputs
against their true domain and the accuracy of the global prompt alone.

``--part grouped`` (REDUCED_GROUPED): ``examples/adaptability/ifca.yaml`` on the politics
corpus with 8 clients grouped by corpus (``by_domain``): K = 1 (FedAvg, whose updates
``cluster_report`` clusters after round 2), K = 2 (IFCA's lowest loss) and K = 2 given by
the corpus column (``assign: profile``), and ``examples/adaptability/update_clusters.yaml``
(one LoRA for rounds 1-2, then one per cluster of the round-2 updates); per-client accuracy
with each client's cluster model, purity against the corpus and against each client's
majority party.

``--part dapt_chain`` (REDUCED_DAPT): party classification of 2012 convention passages with
LoRA, started from MiniLM (no DAPT, R1 + R2 rounds) or from the final State of R1 rounds
of federated masked-LM FFDAPT on the same clients' passages followed by R2 rounds of
fine-tuning (``run_chain``): equal rounds and local steps in total.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

from fedfm.config import from_dict
from fedfm.personalize.init_from import run_chain
from fedfm.runtime import LocalRuntime

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "adaptability"

REDUCED_MD = [
    "federation.examples_per_client=64",
    "federation.test_examples=200",
    "data.max_length=48",
    "train.batch_size=8",
    "rounds=4",
    "eval.every=4",
    "eval.clients=none",
    "runtime.progress=false",
    "runtime.threads=1",
]
MULTIDOMAIN = {  # label: overrides of examples/adaptability/fedapt.yaml (or the config named by CONFIG)
    "single shared prompt (fedapt code, K=1)": ["peft.num_domains=1"],
    "fedapt K=2 (a key per domain)": [],
    "diprompt-inspired M=2 (global + 2 latent domain prompts)": [],
    "diprompt-inspired M=2, assign: client (one domain prompt per client and round)": ["learner.assign=client"],
}
CONFIG = {label: "diprompt" for label in MULTIDOMAIN if label.startswith("diprompt")}
R1, R2 = 2, 2
# fine-tuning rounds of the no-DAPT arms: equal rounds, and equal compute (a round of the
# DAPT stage measured at about twice a fine-tuning round's CPU time: 2 x 2 + 2 = 6)
NO_DAPT_ROUNDS = {"no DAPT": R1 + R2, "no DAPT, 6 rounds (about the DAPT arm's CPU time)": 6}
REDUCED_DAPT = [
    "federation.clients=4",
    "federation.examples_per_client=64",
    "federation.test_examples=200",
    "data.max_length=48",
    "train.batch_size=8",
    "runtime.progress=false",
    "runtime.threads=1",
]


def raw_config(name: str, overrides: list[str]) -> dict:
    from fedfm.config import apply_overrides

    return apply_overrides(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text()), overrides)


def domain_of(frame, rows) -> list[str]:
    return [str(g).split(":", 1)[0] for g in frame["group"].iloc[list(rows)]]


def key_choice(wb, state, items) -> list[int]:
    """The adaptive network's argmax key for each of ``items`` (global model)."""
    wb.evaluate(state, [])  # sets the State
    out = []
    for batch in wb.batches(items):
        with torch.no_grad():
            wb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out += wb.model.fedapt.last_scores.argmax(-1).tolist()
    return out


def query_choice(wb, state, items) -> list[int]:
    """DiPrompT: the domain prompt each of ``items`` is most confident under (global model)."""
    from fedfm.peft.diprompt import assign_domains, query_scores

    wb.evaluate(state, [])  # sets the State
    module, out = wb.model.diprompt, []
    for batch in wb.batches(items):
        with torch.no_grad():
            logits = module.each_prompt(batch["input_ids"], batch["attention_mask"], module.domain_stack())
        out += assign_domains(query_scores(logits)).tolist()
    return out


def run_multidomain(label: str, extra: list[str], out: Path) -> dict:
    config = CONFIG.get(label, "fedapt")
    raw = raw_config(config, REDUCED_MD + extra)
    k = raw["peft"]["num_domains"]
    if k == 1:
        for role in raw["federation"]["roles"]:
            role["profile"]["domain"] = 0
    exp = from_dict(raw, config)
    t0 = time.perf_counter()
    rt = LocalRuntime(exp, out / label.split(" (")[0].replace(" ", "-"), overwrite=True)
    rt.run()
    wall = time.perf_counter() - t0
    wb, state = rt.wb, rt.loop.final_state
    frame = wb.federation.frame
    names = sorted(set(domain_of(frame, frame.index)))
    res = {"label": label, "kind": "multidomain", "overrides": extra, "wall_s": wall}
    test = wb.federation.test_indices.tolist()
    res["accuracy"] = wb.evaluate(state)["accuracy"]
    for d, name in enumerate(names):
        rows = [i for i, n in zip(test, domain_of(frame, test)) if n == name]
        res[f"test_{name}"] = wb.evaluate(state, wb.batches(wb._rows(rows)))["accuracy"]
        res[f"n_test_{name}"] = len(rows)
        held = [i for c in wb.clients if c.profile.get("role") and domain_of(frame, c.indices[:1])[0] == name for i in c.eval_indices]
        res[f"held_{name}"] = wb.evaluate(state, wb.batches(wb._rows(held)))["accuracy"]
        res[f"n_held_{name}"] = len(held)
        res[f"majority_{name}"] = float(max(frame["label"].iloc[rows].mean(), 1 - frame["label"].iloc[rows].mean()))
    truth = [names.index(n) for n in domain_of(frame, test)]
    if config == "diprompt":
        from fedfm.personalize.clustering import purity

        chosen = query_choice(wb, state, wb._rows(test))
        res["query_purity"] = purity(dict(enumerate(chosen)), dict(enumerate(truth)))
        res["query_shares"] = [sum(int(c == m) for c in chosen) / len(chosen) for m in range(k)]
        module = wb.model.diprompt
        g = module.global_weight
        module.global_weight = 1.0  # the global prompt alone
        try:
            res["accuracy_global_prompt"] = wb.evaluate(state)["accuracy"]
        finally:
            module.global_weight = g
    elif k > 1:
        chosen = key_choice(wb, state, wb._rows(test))
        res["key_selection"] = sum(int(a == b) for a, b in zip(chosen, truth)) / len(truth)
    rows = [json.loads(x) for x in (rt.out / "metrics.jsonl").read_text().splitlines()]
    res["bytes_up"] = sum(r.get("bytes_up", 0) for r in rows)
    res["domains"] = names
    return res


REDUCED_GROUPED = [
    "data.source=politics",
    "data.max_length=48",
    "federation.clients=8",
    "federation.partitioner={name: by_domain}",
    "federation.examples_per_client=40",
    "federation.test_examples=100",
    "train.batch_size=8",
    "rounds=3",
    "eval.every=3",
    "eval.clients=none",
    "runtime.progress=false",
    "runtime.threads=1",
]
GROUPED = {  # label: (K, server step): IFCA on clients grouped by corpus (by_domain), the truth
    "ifca k=1 (fedavg); update clusters k=2 after round 2": (
        1, {"name": "cluster_report", "source": "updates", "k": 2, "warmup": 2, "truth_column": "domain"}),
    "ifca k=2 (lowest loss)": (2, {"name": "cluster_report", "truth_column": "domain"}),
    "given clusters k=2 (the corpus column)": (2, {"name": "cluster_report", "truth_column": "domain"}),
    # examples/adaptability/update_clusters.yaml: one LoRA for rounds 1-2, then one per cluster of the round-2 updates
    "update clusters k=2 (served after a 2-round warm-up)": (2, None),
}


def run_grouped(label: str, out: Path) -> dict:
    """IFCA with K models on the politics corpus, clients grouped by corpus (by_domain):
    per-client accuracy with each client's own cluster model, purity against the corpus
    (and against each client's majority party)."""
    from fedfm.personalize.cluster_eval import cluster_client_eval
    from fedfm.personalize.ifca import clusters_from_column

    k, step = GROUPED[label]
    if step is None:
        return run_update_clusters(label, k, out)
    raw = raw_config("ifca", REDUCED_GROUPED + [f"learner.k={k}"])
    raw["server_steps"] = [step]
    if label.startswith("given"):  # FedLFC-style: the cluster of a client is its corpus (assign: profile)
        from fedfm.personalize.ifca import roles_for_clusters
        from fedfm.runtime.workbench import Workbench

        wb = Workbench(from_dict(raw, "ifca"))
        raw["federation"]["roles"] = roles_for_clusters(clusters_from_column(wb.federation.frame, wb.clients, "domain"))
        raw["learner"]["assign"] = "profile"
        del wb
    exp = from_dict(raw, "ifca")
    t0 = time.perf_counter()
    rt = LocalRuntime(exp, out / f"grouped-{'given' if label.startswith('given') else 'k'}{k}", overwrite=True)
    rt.run()
    ss = rt.loop.server_state
    found = next(g["assign"] for name, g in ss.items() if name.endswith(".cluster_report")).tolist()
    models = found if k > 1 else [0] * len(found)  # k = 1: the one model; the step clustered updates
    ev = cluster_client_eval(rt.wb, ss, k, models, rt.store)
    return grouped_result(label, k, rt, found, ev, time.perf_counter() - t0)


def run_update_clusters(label: str, k: int, out: Path) -> dict:
    """``update_clusters`` on the grouped job: its own per-client evaluation (each client with
    the model it is served, in the last round's ``cluster_report`` metrics), checked here
    against a recomputation from the final server state."""
    from fedfm.personalize.cluster_eval import client_accuracies, summary
    from fedfm.personalize.update_clusters import GROUP, served

    exp = from_dict(raw_config("update_clusters", REDUCED_GROUPED + [f"learner.k={k}"]), "update_clusters")
    t0 = time.perf_counter()
    rt = LocalRuntime(exp, out / f"grouped-update-clusters-k{k}", overwrite=True)
    rt.run()
    wall = time.perf_counter() - t0
    ss = rt.loop.server_state
    accs = client_accuracies(rt.wb, lambda c: served(ss, c)[1], [c.cid for c in rt.wb.clients])
    ev = {**summary(accs), "per_client": accs}
    last = json.loads((rt.out / "metrics.jsonl").read_text().splitlines()[-1])
    if abs(last["cluster_report.client_accuracy_mean"] - ev["client_accuracy_mean"]) > 1e-9:
        raise SystemExit(f"per-client accuracy in metrics.jsonl {last['cluster_report.client_accuracy_mean']} "
                         f"differs from the recomputation {ev['client_accuracy_mean']}")
    res = grouped_result(label, k, rt, ss[GROUP]["assign"].tolist(), ev, wall)
    res["clustered_round"] = int(ss[GROUP]["clustered"][0])
    return res


def grouped_result(label: str, k: int, rt, found: list[int], ev: dict, wall: float) -> dict:
    from fedfm.personalize.clustering import purity
    from fedfm.personalize.ifca import clusters_from_column

    frame, clients = rt.wb.federation.frame, rt.wb.clients
    domain = clusters_from_column(frame, clients, "domain")
    party = clusters_from_column(frame, clients, "label")
    rows = [json.loads(x) for x in (rt.out / "metrics.jsonl").read_text().splitlines()]
    known = {c: a for c, a in enumerate(found) if a >= 0}
    accs = ev["per_client"]
    return {
        "label": label, "kind": "grouped", "k": k, "wall_s": wall, "accuracy": rows[-1].get("accuracy"),
        "client_mean": ev["client_accuracy_mean"], "client_worst10": ev["client_accuracy_worst10"],
        "per_client": {str(c): a for c, a in accs.items()}, "assign": found,
        "domains": [domain.get(c) for c in range(len(found))], "parties": [int(party[c]) for c in range(len(found))],
        "purity_domain": purity(known, domain) if known else None,
        "purity_party": purity(known, party) if known else None,
        "domain_means": {d: sum(a for c, a in accs.items() if domain[c] == d) / sum(1 for c in accs if domain[c] == d)
                         for d in sorted(set(domain.values()))},
        "bytes_up": sum(r.get("bytes_up", 0) for r in rows),
    }


def grouped_table(results: list[dict]) -> str:
    if not results:
        return ""
    names = sorted(results[0]["domain_means"])
    head = ["run", "clusters found (client: cluster)", "purity vs corpus", "purity vs majority party", "test acc (cluster 0)",
            "client acc mean", "client acc worst10"] + [f"client acc mean, {n} clients" for n in names] + ["bytes up", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        found = " ".join(f"{c}:{a}" for c, a in enumerate(r["assign"]))
        cells = [r["label"], found, fmt(r["purity_domain"], ".2f"), fmt(r["purity_party"], ".2f"), fmt(r["accuracy"]),
                 fmt(r["client_mean"]), fmt(r["client_worst10"])] + [fmt(r["domain_means"][n]) for n in names] + [
                 f"{r['bytes_up']:,}", f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    r0 = results[0]
    lines.append("")
    lines.append("Clients (corpus, majority party 0 democrat / 1 republican): " + ", ".join(
        f"{c}: {d} {p}" for c, (d, p) in enumerate(zip(r0["domains"], r0["parties"]))) + ".")
    return "\n".join(lines)


def run_dapt_chain(label: str, out: Path) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    tune = raw_config("dapt_chain_finetune", REDUCED_DAPT)
    folder = out / ("with-dapt" if "with" in label else f"no-dapt-{NO_DAPT_ROUNDS[label]}")
    if "with" in label:
        dapt = raw_config("dapt_chain_dapt", REDUCED_DAPT + [f"rounds={R1}", f"eval.every={R1}"])
        tune["rounds"], tune.setdefault("eval", {})["every"] = R2, R2
        run_chain([dapt, tune], folder, overwrite=True)
        stages = [folder / "stage-0", folder / "stage-1"]
    else:
        n = NO_DAPT_ROUNDS[label]
        tune["rounds"], tune.setdefault("eval", {})["every"] = n, n
        LocalRuntime(from_dict(tune, "dapt_chain_finetune"), folder / "stage-0", overwrite=True).run()
        stages = [folder / "stage-0"]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0  # CPU: this process, every thread
    metrics = [[json.loads(x) for x in (s / "metrics.jsonl").read_text().splitlines()] for s in stages]
    last = metrics[-1][-1]
    res = {"label": label, "kind": "dapt_chain", "accuracy": last.get("accuracy"), "loss": last.get("loss"),
           "initial_accuracy": metrics[-1][0].get("accuracy"), "rounds": [len(m) - 1 for m in metrics],
           "bytes_up": sum(r.get("bytes_up", 0) for m in metrics for r in m), "wall_s": wall, "cpu_s": cpu}
    if len(metrics) == 2:
        res["mlm_loss"] = [metrics[0][0].get("loss"), metrics[0][-1].get("loss")]
    return res


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def query_cell(r: dict) -> str:
    if r.get("query_purity") is None:
        return "-"
    return f"{r['query_purity']:.2f} ({' / '.join(f'{x:.2f}' for x in r['query_shares'])})"


def multidomain_table(results: list[dict]) -> str:
    if not results:
        return ""
    names = results[0]["domains"]
    r0 = results[0]
    head = ["prompt", "test acc (all)"] + [f"test acc {n} (n={r0[f'n_test_{n}']})" for n in names] + [
        f"held-out acc {n} (n={r0[f'n_held_{n}']})" for n in names] + [
        "key selection", "query purity (test share per domain prompt)", "global prompt alone", "bytes up", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["label"], fmt(r["accuracy"])] + [fmt(r[f"test_{n}"]) for n in names] + [
            fmt(r[f"held_{n}"]) for n in names] + [fmt(r.get("key_selection"), ".2f"), query_cell(r), fmt(r.get("accuracy_global_prompt")),
            f"{r['bytes_up']:,}", f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Majority-class share of each domain's test rows: " + ", ".join(f"{n} {r0[f'majority_{n}']:.3f}" for n in names) + ".")
    return "\n".join(lines)


def dapt_chain_table(results: list[dict]) -> str:
    head = ["run", "rounds (DAPT + fine-tune)", "MLM test loss r0 -> last", "party acc r0 -> last", "test loss", "bytes up", "CPU s",
            "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        rounds = " + ".join(str(x) for x in r["rounds"]) if len(r["rounds"]) == 2 else f"0 + {r['rounds'][0]}"
        mlm = f"{fmt(r['mlm_loss'][0])} -> {fmt(r['mlm_loss'][1])}" if r.get("mlm_loss") else "-"
        lines.append(f"| {r['label']} | {rounds} | {mlm} | {fmt(r['initial_accuracy'])} -> {fmt(r['accuracy'])} | "
                     f"{fmt(r['loss'])} | {r['bytes_up']:,} | {fmt(r.get('cpu_s'), '.0f')} | {r['wall_s']:.0f} |")
    return "\n".join(lines)
