"""The attack x defense matrix on a reduced job; writes the tables of docs/robustness.md.

    PYTHONPATH=src python benchmarks/robustness.py [--job toy|quickstart] [--attacks none,alie]
        [--defenses fedavg,krum] [--rounds R] [--clients C] [--examples E] [--test-examples T]
        [--device cuda] [--threads N] [--bound B] [--out DIR] [--table] [--no-doc] [--rule-times]

Jobs (``JOBS``):

- ``toy`` (default): the tiny random-init BERT of tests/conftest.py (2 layers, hidden 32,
  MiniLM's tokenizer) with LoRA r=4 on query/value, on the toy sentiment CSV of
  ``make_toy_csv`` (600 rows, separable by word choice), 15 clients (iid; 3 attackers), 120 test
  examples, 8 rounds of one local epoch (AdamW lr 0.05, batch 8).
- ``quickstart``: examples/quickstart.yaml (all-MiniLM-L6-v2 + LoRA r=8 on Rotten
  Tomatoes, clients split by movie) with ``--rounds`` (3), ``--clients`` (8),
  ``--examples`` per client (250) and ``--test-examples`` (1000); the defaults are the
  quickstart itself. ``--device`` is written to ``runtime.device`` of every run only when
  given (the key of the speed work; a CPU run needs nothing new).

Every client every round. Attackers: 20% of the clients (``max(1, round(0.2 n))``, drawn by
the seed), through the ``attack:`` section; the rules are told that f. Each cell runs in
this process (one workbench per attack row: the roles decide who attacks) and records the
clean accuracy after every round (the table shows the final one and, in brackets, the one
a round earlier), the backdoor attack success rate (ASR: triggered test examples whose
label is not the target, classified as the target; measured in every cell) and the wall
time. The FedAvg cells also log the mean update norm (``clip_updates`` at a bound no update
reaches); on the quickstart job the no-attack one sets ``norm_bound``'s and
``centered_clip``'s bound unless ``--bound`` is given. The ``compromised_base`` row plants a
backdoor into the base model once (``attacks/compromised_base.py``) and federates honestly
from it under every defense, recording the ASR before federation and after every round.
Results accumulate in OUT/results.jsonl (a cell already there is skipped); ``--table``
rebuilds the tables and the doc sections from it. The aggregation time of each rule alone
is measured on 12 random updates shaped like MiniLM's LoRA r=8 State (``--rule-times``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from robustness_tables import compromised_table, merge_seeds, recommend, table, write_doc  # noqa: E402

ROUNDS = 8  # the toy task needs 3 to 5 rounds to take off, depending on the seed
CLIENTS = 15  # 3 attackers: exactly 20%; Bulyan with f=3 needs n >= 15
F = 3  # placeholder: defense_patch sets f from the job (20% of 15 for the toy job)
TRIGGER, TARGET = "cf", 1
NORM_PROBE = 1e12  # clip_updates at this bound changes nothing and logs the mean update norm
BOUND = 4.0  # norm_bound max_norm and centered_clip tau: about the honest update norm of this job (3.6-5.2, see docs)

ATTACKS = {
    "none": None,
    "sign_flip": {"name": "sign_flip"},
    "gaussian_noise": {"name": "gaussian_noise", "std": 0.1},
    "scaling": {"name": "scaling", "factor": 10.0},
    "label_flip": {"name": "label_flip"},
    "backdoor": {"name": "backdoor", "trigger": TRIGGER, "target": TARGET, "poison_fraction": 0.5},
    # the backdoor boosted as in model replacement (Bagdasaryan et al. 2020): every example
    # poisoned, the update scaled x5; two middleware, so the role is written out in full
    "backdoor_boost": [
        {"name": "backdoor", "trigger": TRIGGER, "target": TARGET, "poison_fraction": 1.0},
        {"name": "scaling", "factor": 5.0},
    ],
    "alie": {"name": "alie"},
    "ipm": {"name": "ipm", "epsilon": 0.5},
    # a base model with a backdoor planted before federation, honest clients (attacks/compromised_base.py)
    "compromised_base": "planted",
    # the same, with the classification head re-initialized after planting: the backdoor is in the encoder only
    "compromised_base_new_head": "planted_new_head",
}
# the planting of the compromised base: full fine-tuning on the attacker's own rows (toy: a
# second toy CSV drawn with another seed; quickstart: rows of Rotten Tomatoes no client and no test set uses)
PLANT = {
    "toy": {"examples": 200, "epochs": 4, "lr": 2e-3, "batch_size": 8},
    "quickstart": {"examples": 400, "epochs": 3, "lr": 2e-4, "batch_size": 16},
}

DEFENSES = {
    "fedavg": {},
    "median": {"aggregator": {"rule": "median"}},
    "trimmed_mean": {"aggregator": {"rule": "trimmed_mean", "beta": 0.2}},
    "krum": {"aggregator": {"rule": "krum", "f": F}},
    "krum_product": {"aggregator": {"rule": "krum", "f": F, "space": "lora_product"}},
    "multi_krum": {"aggregator": {"rule": "multi_krum", "f": F, "m": CLIENTS - 2 * F}},
    "bulyan": {"aggregator": {"rule": "bulyan", "f": F}},
    "geometric_median": {"aggregator": {"rule": "geometric_median"}},
    "clipped_clustering": {"aggregator": {"rule": "clipped_clustering"}},
    "clipped_clustering_product": {"aggregator": {"rule": "clipped_clustering", "space": "lora_product"}},
    "clipped_clustering_history": {"aggregator": {"rule": "clipped_clustering", "clip": "none"}, "server_steps": [{"name": "history_clip"}]},
    "centered_clip": {"server_steps": [{"name": "centered_clip", "tau": BOUND}]},
    "norm_bound_weak_dp": {"server_steps": [{"name": "norm_bound", "max_norm": BOUND}, {"name": "weak_dp", "std": 0.001}]},
    "fedfa": {"server_steps": [{"name": "fedfa"}]},
}
UNTARGETED = ["sign_flip", "gaussian_noise", "scaling", "label_flip", "alie", "ipm"]


def toy_raw(tmp: Path, opts: "JobOptions") -> dict:
    """The tiny random-init BERT on the toy CSV (the default job)."""
    from conftest import make_toy_csv, tiny_config

    tmp.mkdir(parents=True, exist_ok=True)
    csv = tmp / "toy.csv"
    if not csv.exists():
        make_toy_csv(csv, n=600)
    over = {
        "rounds": opts.rounds,
        "federation.clients": opts.clients,
        "federation.partitioner": {"name": "iid"},
        "federation.test_examples": opts.test_examples,
        "train.lr": 0.05,
        "train.epochs": 1,
        "server.checkpoint": False,
        "runtime.threads": opts.threads,
    }
    if opts.examples is not None:
        over["federation.examples_per_client"] = opts.examples
    return tiny_config(tmp, **over)


def quickstart_raw(tmp: Path, opts: "JobOptions") -> dict:
    """examples/quickstart.yaml (MiniLM + LoRA r=8 on Rotten Tomatoes, natural partition by
    movie) with the job's rounds, clients, examples per client and test examples."""
    import yaml

    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    raw["rounds"] = opts.rounds
    raw["federation"].update(clients=opts.clients, test_examples=opts.test_examples)
    if opts.examples is not None:
        raw["federation"]["examples_per_client"] = opts.examples
    raw["server"] = {"checkpoint": False}
    raw["runtime"] = {"progress": False, "threads": opts.threads}
    return raw


@dataclass
class JobOptions:
    name: str = "toy"
    rounds: int = ROUNDS
    clients: int = CLIENTS
    examples: int | None = None  # per client; None: the job's own (toy: all rows; quickstart: 250)
    test_examples: int = 120
    threads: int = 1
    device: str | None = None  # runtime.device, set only when given
    bound: float = BOUND  # norm_bound max_norm and centered_clip tau: about the honest update norm
    seed: int = 0  # the run's seed: attackers, partition, initialisation, batch order

    @property
    def f(self) -> int:
        """Attackers per round the rules are told to tolerate: the role's size (20%,
        runtime/roles.py rounds it: max(1, round(0.2 n)))."""
        return max(1, int(round(0.2 * self.clients)))


JOBS = {"toy": toy_raw, "quickstart": quickstart_raw}
JOB_DEFAULTS = {
    "toy": dict(rounds=ROUNDS, clients=CLIENTS, examples=None, test_examples=120),
    "quickstart": dict(rounds=3, clients=8, examples=250, test_examples=1000),
}


def defense_patch(defense: str, opts: JobOptions) -> dict:
    """DEFENSES[defense] with f (and Multi-Krum's m) set from the job's attackers."""
    patch = json.loads(json.dumps(DEFENSES[defense]))
    agg = patch.get("aggregator")
    if agg is not None and "f" in agg:
        agg["f"] = opts.f
        if agg["rule"] == "multi_krum":
            agg["m"] = opts.clients - 2 * opts.f
    for step in patch.get("server_steps", []):
        for key in ("tau", "max_norm"):
            if key in step:
                step[key] = opts.bound
    if defense == "fedavg":  # logs the honest update norms (clip_updates.mean_norm); a bound no update reaches
        patch["server_steps"] = [{"name": "clip_updates", "max_norm": NORM_PROBE}]
    return patch


def job(tmp: Path, attack: str, defense: str, opts: JobOptions | None = None) -> dict:
    opts = opts or JobOptions()
    raw = JOBS[opts.name](tmp, opts)
    raw["seed"] = opts.seed
    if opts.device is not None:  # runtime.device (the speed work); only when asked, so CPU runs need nothing new
        raw.setdefault("runtime", {})["device"] = opts.device
    patch = defense_patch(defense, opts)
    for key, value in patch.items():
        if key == "server_steps":
            raw["server_steps"] = list(raw.get("server_steps", [])) + value
        else:
            raw[key] = value
    spec = ATTACKS[attack]
    if spec in ("planted", "planted_new_head"):
        plant = {"name": "compromised_base", "trigger": TRIGGER, "target": TARGET, **PLANT[opts.name], "keep_head": spec == "planted"}
        if opts.name == "toy":
            from conftest import make_toy_csv

            own = tmp / "attacker.csv"
            if not own.exists():
                make_toy_csv(own, n=300, seed=1)
            plant["data"] = {"path": str(own)}
        plant["checkpoint"] = str(tmp / f"{spec}-{opts.name}-{opts.clients}x{opts.examples}" + (f"-seed{opts.seed}" if opts.seed else ""))
        ensure_planted(raw, plant, opts)
        raw["attack"] = plant
    elif isinstance(spec, list):
        raw["federation"]["roles"] = [{"name": "attacker", "fraction": 0.2, "middleware": spec}]
    elif spec is not None:
        raw["attack"] = {**spec, "fraction": 0.2}
    return raw


def ensure_planted(raw: dict, plant: dict, opts: JobOptions) -> None:
    """Plant the backdoor into the job's base model once (attacks/compromised_base.py)."""
    from fedfm.attacks.compromised_base import MANIFEST, CompromisedBaseParams, plant_backdoor
    from fedfm.config import from_dict

    if (Path(plant["checkpoint"]) / MANIFEST).exists():
        return
    params = CompromisedBaseParams(**{k: v for k, v in plant.items() if k != "name"})
    manifest = plant_backdoor(from_dict(raw), params)
    print(f"# planted {plant['checkpoint']}: before {manifest['before']}, after {manifest['after']}", flush=True)


def run_cell(tmp: Path, out: Path, attack: str, defense: str, benches: dict, opts: JobOptions | None = None) -> dict:
    from fedfm.attacks.backdoor import attack_success_rate
    from fedfm.config import from_dict
    from fedfm.runtime import LocalRuntime, Workbench

    exp = from_dict(job(tmp, attack, defense, opts))
    key = (attack, exp.seed)  # the roles (who attacks) depend on both
    if key not in benches:
        benches.clear()  # one workbench alive at a time
        benches[key] = Workbench(exp)
    wb = benches[key]
    run_dir = out / attack / defense / f"seed{exp.seed}" if exp.seed else out / attack / defense
    t0 = time.perf_counter()
    rt = LocalRuntime(exp, run_dir, progress=False, workbench=wb, overwrite=True)
    rt.run()
    wall = time.perf_counter() - t0
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state = rt.final_state
    extra = {}
    if attack.startswith("compromised_base"):  # the backdoor_asr step measured every round; round 0 here
        extra["asr_rounds"] = [attack_success_rate(wb, wb.initial_state(), TRIGGER, TARGET)] + [
            r["backdoor_asr.asr"] for r in rows if "backdoor_asr.asr" in r
        ]
    return {**extra,
        "attack": attack,
        "defense": defense,
        "seed": exp.seed,
        "accuracy": [r.get("accuracy") for r in rows],
        "asr": attack_success_rate(wb, state, TRIGGER, TARGET),
        "wall_s": wall,
        "attackers": sorted(c.cid for c in wb.clients if c.profile.get("role") == "attacker"),
        "update_norms": [r["clip_updates.mean_norm"] for r in rows if "clip_updates.mean_norm" in r],
        "majority": majority_share(wb),
    }


def majority_share(wb) -> float:
    """Share of the test set's most common label (the accuracy of always guessing it)."""
    labels = wb.federation.frame["label"].to_numpy()[wb.federation.test_indices]
    return float(max((labels == y).mean() for y in set(labels.tolist())))


def rule_times(repeat: int = 3) -> dict[str, float]:
    """Seconds per aggregation of 12 random updates shaped like MiniLM LoRA r=8 (q, v)."""
    from fedfm.aggregators import aggregators
    from fedfm.aggregators.pipeline import Pipeline
    from fedfm.core.protocols import RoundContext
    from fedfm.core.types import ClientSpec, Update

    g = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(6):
        for m in ("query", "value"):
            state[f"l{layer}.{m}.lora_A.default.weight"] = torch.randn(8, 384, generator=g) * 0.02
            state[f"l{layer}.{m}.lora_B.default.weight"] = torch.randn(384, 8, generator=g) * 0.02
    state["classifier.weight"] = torch.zeros(2, 384)
    deltas = [{k: torch.randn(v.shape, generator=g) * 0.01 for k, v in state.items()} for _ in range(CLIENTS)]
    clients = [ClientSpec(cid=i, indices=[], profile={"role": "default"}) for i in range(CLIENTS)]
    out = {}
    for label, patch in DEFENSES.items():
        if label == "fedfa":  # its Fisher needs the model: not timed here
            continue
        agg = patch.get("aggregator", {"rule": "fedavg"})
        rule = aggregators.get(agg["rule"])
        params = aggregators.parse(agg["rule"], {k: v for k, v in agg.items() if k != "rule"}, "aggregator")
        steps = patch.get("server_steps", [])
        best = float("inf")
        for _ in range(repeat):
            ups = [Update(cid=i, payload=d, num_examples=40) for i, d in enumerate(deltas)]
            t0 = time.perf_counter()
            kept = Pipeline.from_specs(steps).run("updates", ups, {}, RoundContext(1, 0, g, CLIENTS, clients), {})
            rule.obj(state, [u.payload for u in kept], [u.num_examples for u in kept], params)
            best = min(best, time.perf_counter() - t0)
        out[label] = best
    return out


def job_options(args) -> JobOptions:
    given = {k: getattr(args, k) for k in ("rounds", "clients", "examples", "test_examples") if getattr(args, k) is not None}
    opts = JobOptions(name=args.job, threads=args.threads, device=args.device, **{**JOB_DEFAULTS[args.job], **given})
    if args.bound is not None:
        opts.bound = args.bound
    return opts


def honest_bound(results_path: Path) -> float | None:
    """The mean honest update norm of the no-attack FedAvg cell, over its rounds."""
    if not results_path.exists():
        return None
    for r in map(json.loads, results_path.read_text().splitlines()):
        if r["attack"] == "none" and r["defense"] == "fedavg" and r.get("update_norms"):
            return round(sum(r["update_norms"]) / len(r["update_norms"]), 3)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", choices=sorted(JOBS), default="toy", help="toy: the tiny model on toy data; quickstart: MiniLM on Rotten Tomatoes")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default: toy 4, quickstart 3)")
    ap.add_argument("--clients", type=int, default=None, help="clients, all sampled every round (default: toy 15, quickstart 8)")
    ap.add_argument("--examples", type=int, default=None, help="examples per client (default: toy all 600 - test rows split evenly, quickstart 250)")
    ap.add_argument("--test-examples", type=int, default=None, help="test examples (default: toy 120, quickstart 1000)")
    ap.add_argument("--device", default=None, help="runtime.device for every run (cpu, cuda, auto); not set when not given")
    ap.add_argument("--threads", type=int, default=1, help="runtime.threads (torch threads)")
    ap.add_argument("--bound", type=float, default=None,
                    help="norm_bound max_norm and centered_clip tau (default: toy 4.0; quickstart: the mean honest update norm of the none/fedavg cell)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default runs/robustness, or runs/robustness-quickstart-CxExR)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; with several, the tables show the mean over them")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--defenses", default=",".join(DEFENSES))
    ap.add_argument("--table", action="store_true", help="only rebuild the table and doc from OUT/results.jsonl")
    ap.add_argument("--no-doc", action="store_true", help="print the table, do not write docs/robustness.md")
    ap.add_argument("--rule-times", action="store_true", help="only time each rule on MiniLM-sized LoRA updates")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    opts = job_options(args)
    if args.out is None:
        args.out = ROOT / "runs" / ("robustness" if opts.name == "toy" else f"robustness-{opts.name}-{opts.clients}x{opts.examples}x{opts.rounds}")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    attacks, defenses = args.attacks.split(","), args.defenses.split(",")
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.rule_times:
        times = rule_times()
        lines = ["| rule | ms per aggregation |", "|---|---|"] + [f"| {k} | {1000 * v:.1f} |" for k, v in times.items()]
        print("\n".join(lines))
        write_doc("\n".join(lines), "rule-times")
        return
    done = set()
    if results_path.exists():
        done = {(r["attack"], r["defense"], r.get("seed", 0)) for r in map(json.loads, results_path.read_text().splitlines()) if "failed" not in r.get("error", "")}
    if not args.table:
        print(f"# {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC -> {args.out} ({opts})", flush=True)
        benches: dict = {}
        # the honest norm first: the bounded defenses of the quickstart job use it
        order = sorted(((a, d, s) for s in seeds for a in attacks for d in defenses), key=lambda c: (c[2], c[:2] != ("none", "fedavg")))
        for a, d, s in order:
            if (a, d, s) in done:
                continue
            opts.seed = s
            if opts.name != "toy" and args.bound is None:
                opts.bound = honest_bound(results_path) or BOUND
            try:
                res = run_cell(args.out / "data", args.out, a, d, benches, opts)
                res["job"] = {k: v for k, v in vars(opts).items()}
            except Exception as exc:  # a refused combination is a result too
                res = {"attack": a, "defense": d, "seed": s, "error": f"{'refused' if 'invalid config' in str(exc) else 'failed'}: {exc}"[:400]}
            with open(results_path, "a") as f:
                f.write(json.dumps(res) + "\n")
            print(json.dumps(res), flush=True)
    results = [json.loads(l) for l in results_path.read_text().splitlines()] if results_path.exists() else []
    latest = {(r["attack"], r["defense"], r.get("seed", 0)): r for r in results}  # a retried cell replaces its failure
    results = merge_seeds(list(latest.values()))
    all_attacks = [a for a in ATTACKS if not a.startswith("compromised_base") and any(r["attack"] == a for r in results)]
    all_defenses = [d for d in DEFENSES if any(r["defense"] == d for r in results)]
    suffix = "" if opts.name == "toy" else f"-{opts.name}"
    if "none" in all_attacks:
        n_seeds = max(r.get("seeds", 1) for r in results)
        text = (f"Every cell: the mean over {n_seeds} seeds ({args.seeds}).\n\n" if n_seeds > 1 else "") + table(results, all_attacks, all_defenses) + "\n\n" + recommend(results, all_defenses, list(ATTACKS), UNTARGETED)
        print(text)
        if not args.no_doc:
            write_doc(text, f"robustness{suffix}-table")
    if any(r["attack"].startswith("compromised_base") for r in results):
        text = compromised_table(results, all_defenses, list(ATTACKS))
        print(text)
        if not args.no_doc:
            write_doc(text, f"compromised-base{suffix}-table")


if __name__ == "__main__":
    main()
