"""Global vs personalized accuracy per personalization method, on label-skewed Rotten Tomatoes.

    PYTHONPATH=src nice -n 10 python benchmarks/adaptability.py --out runs/adaptability [--only fedavg,feddat]
        [--doc docs/adaptability.md] [-o rounds=5 ...] [--table]
    PYTHONPATH=src python benchmarks/adaptability.py --predictions runs/adaptability/local-head

The REDUCED job (default overrides ``REDUCED``): MiniLM (all-MiniLM-L6-v2), Rotten
Tomatoes, 4 clients with a Dirichlet(alpha = 0.1) label skew, 40 examples each of which 20%
(8) is the client's own held-out slice, texts cut to 32 tokens, batch 8, 3 rounds, all
clients every round, test set of 300.
Every method runs its example config (examples/adaptability/) in this process, one after
the other, with those overrides.

A row gives the global test accuracy (the server's shared State; for local heads and
personal prompts the server completes it with the *initial* local part, see the doc) and
the per-client accuracy on each client's own held-out slice, mean and worst decile
(``client_accuracy_mean`` / ``client_accuracy_worst10`` of the last round) and the same for
the per-client balanced accuracy (the mean over the labels in a client's slice of each
label's recall: 0.5 on a two-label slice for a model that answers one label). For IFCA and
the given clusters each client is evaluated with its own cluster's model
(``personalize/cluster_eval.py``), and the cluster purity against each client's majority
label is reported; "majority label (no model)" predicts each client's training majority
label on its held-out slice (and the pooled one on the test set), the label prior a
personalized model must beat; "update clusters" is one global model whose clients ``cluster_report``
clusters by the cosine similarity of their round-2 updates (purity only). The DAPT rows
run federated masked-LM further pre-training (``examples/adaptability/dapt_ffdapt.yaml``)
on the same job, fully and FFDAPT-style, and give the masked-LM loss and masked-token
accuracy on the test texts before and after. ``--doc`` rewrites the block between the
markers of docs/adaptability.md; results accumulate in OUT/results.jsonl (``--table``
re-renders them without running).

``--part multidomain`` (FedAPT and DiPrompT-inspired prompts against a single shared prompt,
per domain), ``--part dapt_chain`` (fine-tuning with and without a DAPT stage at equal
rounds) and ``--part grouped`` (IFCA K = 1 against K = 2, the given clusters and
``update_clusters`` on clients grouped by corpus: purity and per-client accuracy) run the jobs of
``benchmarks/adaptability_parts.py`` (their own overrides, results files and doc blocks).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedfm.config import from_dict  # noqa: E402
from fedfm.personalize.cluster_eval import cluster_client_eval  # noqa: E402
from fedfm.personalize.clustering import purity  # noqa: E402
from fedfm.personalize.ifca import clusters_from_column, roles_for_clusters  # noqa: E402
from fedfm.runtime import LocalRuntime  # noqa: E402
from fedfm.runtime.workbench import Workbench  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import adaptability_parts as parts  # noqa: E402

REDUCED = [
    "federation.clients=4",
    "federation.examples_per_client=40",
    "federation.test_examples=300",
    "data.max_length=32",
    "train.batch_size=8",
    "rounds=3",
    "eval.every=3",
    "runtime.progress=false",
    "runtime.threads=1",
]
METHODS = {  # label: (example config, extra overrides)
    "fedavg (global)": ("local_head", ["peft.local=[]"]),
    "local head": ("local_head", []),
    "personal prompt": ("personal_prompt", []),
    "feddat": ("feddat", []),
    "ifca k=2": ("ifca", ["eval.clients=none"]),
    "given clusters (label) k=2": ("given_clusters", ["eval.clients=none"]),
    "majority label (no model)": ("majority", []),  # each client predicts its training majority; global: the pooled one
    "update clusters k=2 (one global model)": (  # report only; update_clusters serves a model per cluster (--part grouped)
        "local_head", ["peft.local=[]", "server_steps=[{name: cluster_report, source: updates, k: 2, warmup: 2, truth_column: label}]"]
    ),
}
DAPT = {  # federated masked-LM further pre-training on the same clients' text (labels unused)
    "dapt: full": ("dapt_ffdapt", ["peft={method: full}"]),
    "dapt: ffdapt, layers 0-2 frozen": ("dapt_ffdapt", []),
    "dapt: ffdapt, layers 0-2 + embeddings frozen": ("dapt_ffdapt", ["peft.freeze_embeddings=true"]),
    "dapt: fedbfpt PL-SDL (local 3 of 6 layers; layer 0, 0, 1 + head trained)": ("dapt_fedbfpt", []),
}
FULL = ["runtime.progress=false", "runtime.threads=1"]  # --full: the example configs as written
BEGIN, END = "<!-- adaptability:begin -->", "<!-- adaptability:end -->"


def load(config: str, overrides: list[str], roles: list[dict] | None = None):
    raw = yaml.safe_load((ROOT / "examples" / "adaptability" / f"{config}.yaml").read_text())
    if roles is not None:
        raw.setdefault("federation", {})["roles"] = roles
        raw["server_steps"] = [{"name": "cluster_report", "truth_profile": "majority"}]
    return from_dict(raw, config, overrides)


def label_roles(exp) -> list[dict]:
    """One role per majority label, with the cluster index and the label as profile."""
    wb = Workbench(exp)
    groups = clusters_from_column(wb.federation.frame, wb.clients, "label")
    roles = roles_for_clusters(groups)
    for r in roles:
        r["profile"]["majority"] = int(groups[r["cids"][0]])
    return roles


def balanced_accuracy(right, truth) -> float:
    """Mean over the labels in ``truth`` of the share of their examples that are ``right``
    (numpy arrays of the same length), as ``tasks/class_tally.py`` counts it."""
    import numpy as np

    return float(np.mean([right[truth == y].mean() for y in np.unique(truth)]))


def majority_baseline(exp) -> dict:
    """The accuracies of predicting, with no model, each client's training majority label on
    its held-out slice (mean and worst decile, as ``eval.clients``) and the pooled training
    majority on the test set: what a personalized model must beat to have learned more than
    its client's label prior."""
    import numpy as np

    from fedfm.runtime.client_eval import worst_decile

    wb = Workbench(exp)
    labels = wb.federation.frame["label"].to_numpy()
    acc, balanced = [], []
    for c in wb.clients:
        if c.eval_indices:
            truth = labels[c.eval_indices]
            right = truth == np.bincount(labels[c.indices]).argmax()
            acc.append(float(right.mean()))
            balanced.append(balanced_accuracy(right, truth))
    pooled = np.bincount(labels[[i for c in wb.clients for i in c.indices]]).argmax()
    return {"accuracy": float((labels[wb.federation.test_indices] == pooled).mean()), "client_mean": float(np.mean(acc)),
            "client_worst10": worst_decile(acc), "client_bal_mean": float(np.mean(balanced)),
            "client_bal_worst10": worst_decile(balanced), "bytes_up": 0}


def cluster_states(run: Path, final: dict) -> tuple[list[dict], list[int]]:
    """The k cluster models and the clients' assignment of a finished IFCA run."""
    from safetensors.torch import load_file

    checkpoints = sorted((run / "checkpoints").glob("round-*/algorithm.safetensors"))
    if not checkpoints:
        raise SystemExit(f"{run}: an IFCA run without checkpoints/round-*/algorithm.safetensors")
    saved = load_file(checkpoints[-1])
    assign = next((v.tolist() for k, v in saved.items() if k.endswith(".cluster_report/assign")), None)
    if assign is None:
        raise SystemExit(f"{checkpoints[-1]}: no cluster_report assignment (the run needs server_steps: [cluster_report])")
    groups: dict[int, dict] = {0: final}
    for key, value in saved.items():
        group, _, name = key.partition("/")
        if group.startswith("model."):
            groups.setdefault(int(group.split(".", 1)[1]), {})[name] = value
    return [groups[j] for j in range(len(groups))], [int(a) for a in assign]


def predictions(run: Path) -> str:
    """``--predictions RUN``: for each client of a finished run (its ``config.yaml``,
    ``final.safetensors`` and each client's ``local_state.safetensors`` when it keeps one),
    how many of its held-out examples the client's model predicts as each label, its
    accuracy, and the accuracy of its training majority label: a model that predicts one
    label for the whole slice has learned its client's label prior, nothing more. An IFCA
    run (given clusters too) serves each client its cluster's model: cluster 0 is ``final``,
    the others and the assignment ``cluster_report`` kept come from the last checkpoint's
    ``algorithm.safetensors``; a client never assigned is refused, not guessed."""
    import numpy as np
    from safetensors.torch import load_file

    from fedfm.peft.state import set_state

    wb = Workbench(from_dict(yaml.safe_load((run / "config.yaml").read_text())))
    labels, final = wb.federation.frame["label"].to_numpy(), load_file(run / "final.safetensors")
    clusters, assign = cluster_states(run, final) if wb.exp.learner.name == "ifca" else ([final], None)
    n_labels = int(labels.max()) + 1
    lines = ["| client | predicted per label | accuracy | balanced accuracy | its majority label's accuracy |",
             "|---|---|---|---|---|"]
    accs = []
    for c in wb.clients:
        own = run / "clients" / str(c.cid) / "local_state.safetensors"
        if assign is not None and assign[c.cid] < 0:
            raise SystemExit(f"{run}: client {c.cid} was never assigned a cluster (cluster_report's assign)")
        model = clusters[assign[c.cid]] if assign is not None else final
        set_state(wb.model, wb.full_state({**model, **(load_file(own) if own.exists() else {})}))
        wb.model.eval()
        pred, truth = [], []
        with torch.inference_mode():
            for batch in wb.batches(wb.eval_examples(c.cid)):  # sorted by length: the labels come with each batch
                truth += batch.pop("labels").tolist()
                pred += wb.model(**batch).logits.argmax(-1).tolist()
        truth, right = np.array(truth), np.array(pred) == np.array(truth)
        accs.append(float(right.mean()))
        balanced = balanced_accuracy(right, truth)
        majority = np.bincount(labels[c.indices], minlength=n_labels).argmax()
        lines.append(f"| {c.cid} | {' / '.join(str(x) for x in np.bincount(pred, minlength=n_labels))} | "
                     f"{right.mean():.3f} | {balanced:.3f} | {(truth == majority).mean():.3f} |")
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    reported = last.get("client_accuracy_mean")
    lines.append(f"\nmean accuracy {np.mean(accs):.4f} " + (f"(the run's last client_accuracy_mean: {reported})" if reported is not None
                 else "(the loop reports none for cluster models: compare the benchmark's client_mean)"))
    return "\n".join(lines)


def run_method(label: str, config: str, extra: list[str], common: list[str], out: Path) -> dict:
    overrides = REDUCED + common + extra
    if config == "majority":
        t0 = time.perf_counter()
        res = majority_baseline(load("local_head", overrides))
        return {"label": label, "config": config, "overrides": overrides[len(REDUCED):], **res, "wall_s": time.perf_counter() - t0}
    roles = None
    if config == "given_clusters":  # the example's roles are for its own partition: rebuild them
        # (from a plain local run of the same data: ifca with assign: profile refuses clients without a cluster)
        roles = label_roles(load(config, overrides + ["learner={name: local}", "server_steps=[]", "federation.roles=[]"]))
    exp = load(config, overrides, roles)
    t0 = time.perf_counter()
    rt = LocalRuntime(exp, out / re.sub(r"[^a-z0-9]+", "-", label).strip("-"), overwrite=True)
    rt.run()
    rows = [json.loads(x) for x in (rt.out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    res = {"label": label, "config": config, "overrides": overrides[len(REDUCED):], "accuracy": last.get("accuracy"),
           "client_mean": last.get("client_accuracy_mean"), "client_worst10": last.get("client_accuracy_worst10"),
           "client_bal_mean": last.get("client_balanced_accuracy_mean"),
           "client_bal_worst10": last.get("client_balanced_accuracy_worst10"),
           "bytes_up": sum(r.get("bytes_up", 0) for r in rows)}
    purities = [r["cluster_report.purity"] for r in rows if "cluster_report.purity" in r]
    if purities:
        res["purity"] = purities[-1]
    if label in DAPT:
        res.update(kind="dapt", initial_loss=rows[0].get("loss"), initial_accuracy=rows[0].get("accuracy"),
                   loss=last.get("loss"))
    if exp.learner.name == "ifca":
        ss = rt.loop.server_state
        assign = next(g["assign"] for name, g in ss.items() if name.endswith(".cluster_report")).tolist()
        ev = cluster_client_eval(rt.wb, ss, exp.learner.params()["k"], assign, rt.store)
        res.update(client_mean=ev["client_accuracy_mean"], client_worst10=ev["client_accuracy_worst10"], assign=assign,
                   client_bal_mean=ev.get("client_balanced_accuracy_mean"),
                   client_bal_worst10=ev.get("client_balanced_accuracy_worst10"))
        truth = clusters_from_column(rt.wb.federation.frame, rt.wb.clients, "label")
        res["purity"] = purity({c: a for c, a in enumerate(assign) if a >= 0}, truth)
    res["wall_s"] = time.perf_counter() - t0
    return res


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def dapt_table(results: list[dict]) -> str:
    head = ["DAPT run", "MLM test loss r0 -> last", "masked-token acc r0 -> last", "bytes up", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append(
            f"| {r['label']} | {fmt(r['initial_loss'])} -> {fmt(r['loss'])} | {fmt(r['initial_accuracy'])} -> "
            f"{fmt(r['accuracy'])} | {r['bytes_up']:,} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    dapt = [r for r in results if r.get("kind") == "dapt"]
    results = [r for r in results if r.get("kind") != "dapt"]
    balanced = any(r.get("client_bal_mean") is not None for r in results)  # results before the balanced columns lack them
    head = ["method", "global acc", "client acc mean", "client acc worst10"]
    head += ["client bal acc mean", "client bal acc worst10"] if balanced else []
    head += ["purity", "bytes up", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        bal = f"{fmt(r.get('client_bal_mean'))} | {fmt(r.get('client_bal_worst10'))} | " if balanced else ""
        lines.append(
            f"| {r['label']} | {fmt(r['accuracy'])} | {fmt(r['client_mean'])} | {fmt(r['client_worst10'])} | {bal}"
            f"{fmt(r.get('purity'), '.2f')} | {r['bytes_up']:,} | {r['wall_s']:.0f} |"
        )
    if dapt:
        lines += ["", dapt_table(dapt)]
    return "\n".join(lines)


def write_doc(doc: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    body = doc.read_text()
    if begin not in body or end not in body:
        raise SystemExit(f"{doc} lacks the markers {begin} ... {end}")
    head, rest = body.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "adaptability")
    ap.add_argument("--only", default="", help="comma-separated method labels (prefixes) to run")
    ap.add_argument("--doc", type=Path, default=None, help="rewrite the results block of this doc")
    ap.add_argument("-o", "--override", action="append", default=[], help="override passed to every run")
    ap.add_argument("--table", action="store_true", help="only print (and --doc write) the table of OUT/results.jsonl")
    ap.add_argument("--predictions", type=Path, default=None, metavar="RUN",
                    help="only print each client's predictions per label on its held-out slice, for a finished run directory")
    ap.add_argument("--part", choices=["personalize", "multidomain", "dapt_chain", "grouped"], default="personalize")
    ap.add_argument("--full", action="store_true",
                    help="the example configs as written (full size), not the reduced job; doc block '<part>-full'")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.predictions is not None:
        print(predictions(args.predictions))
        return
    if args.full:  # every reduced job list becomes the full-size one
        global REDUCED, BEGIN, END
        REDUCED = FULL
        BEGIN, END = "<!-- adaptability-full:begin -->", "<!-- adaptability-full:end -->"
        parts.REDUCED_DAPT = FULL
        parts.REDUCED_MD = FULL + ["eval.clients=none"]  # the per-domain table evaluates by itself
        parts.REDUCED_GROUPED = FULL + [  # the grouped corpus is the job: politics, clients by corpus
            "data.source=politics", "federation.partitioner={name: by_domain}", "federation.examples_per_client=200",
            "federation.test_examples=300", "eval.clients=none"]
    if args.part != "personalize":
        return run_part(args)
    every = {**METHODS, **DAPT}
    plan = {k: v for k, v in every.items() if not args.only or any(k.startswith(p) for p in args.only.split(","))}
    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
    results_path = args.out / "results.jsonl"
    if not args.table:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"# {stamp}: {len(plan)} runs -> {args.out}", flush=True)
        for label, (config, extra) in plan.items():
            res = run_method(label, config, extra, args.override, args.out)
            res["measured"] = stamp
            print(json.dumps(res), flush=True)
            with open(results_path, "a") as f:
                f.write(json.dumps(res) + "\n")
    results = [json.loads(x) for x in results_path.read_text().splitlines()] if results_path.exists() else []
    text = table(results)
    print(text)
    if args.doc is not None:
        when = sorted({r.get("measured", "?") for r in results})
        write_doc(args.doc, f"Measured {', '.join(when)}; job overrides: `{' '.join(REDUCED + args.override)}`.\n\n{text}", BEGIN, END)


PARTS = {  # part: (labels, run one, table, results file, job overrides)
    "multidomain": (list(parts.MULTIDOMAIN), lambda label, out: parts.run_multidomain(label, parts.MULTIDOMAIN[label], out),
                    parts.multidomain_table, "multidomain.jsonl", parts.REDUCED_MD),
    "dapt_chain": (list(parts.NO_DAPT_ROUNDS) + ["with DAPT (ffdapt, layers 0-2 + embeddings frozen)"], parts.run_dapt_chain,
                   parts.dapt_chain_table, "dapt_chain.jsonl", parts.REDUCED_DAPT),
    "grouped": (list(parts.GROUPED), parts.run_grouped, parts.grouped_table, "grouped.jsonl", parts.REDUCED_GROUPED),
}


def run_part(args) -> None:
    labels, run_one, render, name, job = PARTS[args.part]
    job = {"multidomain": parts.REDUCED_MD, "dapt_chain": parts.REDUCED_DAPT, "grouped": parts.REDUCED_GROUPED}[args.part]
    path = args.out / name
    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
    if not args.table:
        args.out.mkdir(parents=True, exist_ok=True)
        for label in labels:
            if args.only and not any(label.startswith(p) for p in args.only.split(",")):
                continue
            res = run_one(label, args.out)
            res["measured"] = stamp
            print(json.dumps(res), flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(res) + "\n")
    results = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    text = render(results)
    print(text)
    if args.doc is not None:
        when = sorted({r.get("measured", "?") for r in results})
        write_doc(args.doc, f"Measured {', '.join(when)}; job overrides: `{' '.join(job)}`.\n\n{text}",
                  f"<!-- {args.part}{'-full' if args.full else ''}:begin -->", f"<!-- {args.part}{'-full' if args.full else ''}:end -->")


if __name__ == "__main__":
    main()
