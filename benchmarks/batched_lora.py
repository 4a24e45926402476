"""The training phase alone: sequential local training vs multi-adapter batched LoRA.

``benchmarks/speed.py`` measures whole runs (model load, evaluation, bookkeeping). This
script isolates what ``runtime.transport: batched`` changes: the clients' local training.
In one process, on one workbench (model loaded once), it trains the same clients from the
same initial State (i) one after another with the ``local`` learner and (ii) ``K`` at a
time with ``learners/multi_lora.py`` ``train_jointly``, for each ``K`` and each adapter
kernel given (``runtime.batch_kernel``), ``--repeat``
times each (the minimum wall time is kept), and prints the wall time, the ratio to
sequential, and how far the batched updates are from the sequential ones (largest
absolute difference, and largest relative norm difference over the tensors).
``--dropout-reference`` adds a sequential run with other dropout masks (same batches):
the distance dropout alone puts between two equally valid runs.

``--tiny`` swaps the model for the random-init tiny BERT of tests/conftest.py (hidden 32,
2 layers): a step there costs little arithmetic, so per-step overhead (Python, autograd,
optimizer, kernel launches) dominates, as it does for a small model on a GPU.

    PYTHONPATH=src python benchmarks/batched_lora.py [--config examples/quickstart.yaml]
        [--clients 4] [--examples 64] [--k 2,4] [--kernel segments,stacked] [--threads 1] [--repeat 2] [--tiny] [--no-dropout] [--dropout-reference]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = ["model.init=random", "model.config_overrides.hidden_size=32", "model.config_overrides.num_hidden_layers=2",
        "model.config_overrides.num_attention_heads=2", "model.config_overrides.intermediate_size=64"]
NO_DROPOUT = ["model.config_overrides.hidden_dropout_prob=0.0", "model.config_overrides.attention_probs_dropout_prob=0.0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/quickstart.yaml")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--examples", type=int, default=64, help="federation.examples_per_client")
    ap.add_argument("--k", default="2,4", help="clients per joint pass, comma-separated")
    ap.add_argument("--kernel", default="segments,stacked",
                    help="runtime.batch_kernel values to time, comma-separated (segments: a pair of matmuls per client; "
                    "stacked: two bmm per layer for all K)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="the tiny random-init BERT of the tests instead of the config's model")
    ap.add_argument("--no-dropout", action="store_true", help="dropout off: the batched updates then differ by float rounding only")
    ap.add_argument("--dropout-reference", action="store_true",
                    help="also train sequentially with other dropout masks (batches unchanged): how far dropout alone moves the updates")
    ap.add_argument("--override", "-o", action="append", default=[])
    args = ap.parse_args()

    import torch

    from fedfm.config import load_config
    from fedfm.core.types import Instruction
    from fedfm.learners.local import LocalLearner
    from fedfm.learners.multi_lora import train_jointly
    from fedfm.runtime.workbench import Workbench

    torch.set_num_threads(args.threads)
    over = [f"federation.clients={args.clients}", f"federation.examples_per_client={args.examples}",
            "federation.test_examples=40", "runtime.progress=false", *args.override]
    over += TINY if args.tiny else []
    over += NO_DROPOUT if args.no_dropout else []
    wb = Workbench(load_config(args.config, over))
    jobs = lambda: [(Instruction(round=1, cid=c, state=wb.initial_state()), wb.context(c, 1)) for c in range(args.clients)]

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        return best, out

    seq_s, seq = timed(lambda: [LocalLearner().local_update(i, c) for i, c in jobs()])
    steps = sum(u.metrics["steps"] for u in seq)
    print(f"model {'tiny BERT' if args.tiny else wb.exp.model.package}, {args.clients} clients x {args.examples} examples, "
          f"{int(steps)} client steps, {args.threads} thread(s), dropout {'off' if args.no_dropout else 'as configured'}")
    print("| training | wall (s) | ratio to sequential | max abs diff | max rel norm diff |")
    print("|---|---:|---:|---:|---:|")
    print(f"| sequential (local learner) | {seq_s:.2f} | 1.000 | - | - |")

    def diffs(bat) -> str:
        abs_diff = max((b.payload[n] - a.payload[n]).abs().max().item() for a, b in zip(seq, bat) for n in a.payload)
        rel = max(((b.payload[n] - a.payload[n]).norm() / a.payload[n].norm().clamp_min(1e-30)).item()
                  for a, b in zip(seq, bat) for n in a.payload)
        return f"{abs_diff:.2e} | {rel:.2e}"

    if args.dropout_reference:  # the same training with other dropout masks: the scale of dropout's effect
        seed = torch.manual_seed
        torch.manual_seed = lambda s: seed(s + 1)  # train_loop seeds its dropout masks with torch.manual_seed
        try:
            ref_s, ref = timed(lambda: [LocalLearner().local_update(i, c) for i, c in jobs()])
        finally:
            torch.manual_seed = seed
        print(f"| sequential, other dropout masks | {ref_s:.2f} | {ref_s / seq_s:.3f} | {diffs(ref)} |")
    for kernel in [x for x in args.kernel.split(",") if x]:
        for k in [int(x) for x in args.k.split(",") if x]:
            def batched(k=k, kernel=kernel):
                j = jobs()
                return [u for s in range(0, len(j), k) for u, _ in train_jointly(j[s : s + k], kernel=kernel)]

            bat_s, bat = timed(batched)
            print(f"| batched, K={k}, {kernel} | {bat_s:.2f} | {bat_s / seq_s:.3f} | {diffs(bat)} |")


if __name__ == "__main__":
    main()
