"""One training step with and without ``train.unpad``, on the quickstart's own batches.

Loads the job's model and one client's reviews, cuts them into the batches the `local`
learner draws (seeded order, ``train.batch_size``), and times forward + backward of every
batch three ways, alternating the order from pass to pass so that machine load hits all
alike: padded (the model as it is), unpadded (``unpadded(model, first_token=False)``),
and unpadded with the last layer on the first token only (the default for sequence
classification). Prints the real-token share of the padded positions and the time ratios.

    PYTHONPATH=src python benchmarks/unpad_step.py [--config examples/quickstart.yaml] [--client 0] [--passes 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/quickstart.yaml")
    ap.add_argument("--client", type=int, default=0)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from fedfm.config import load_config
    from fedfm.learners.unpad import unpadded
    from fedfm.runtime.workbench import Workbench

    torch.set_num_threads(args.threads)
    exp = load_config(args.config)
    wb = Workbench(exp)
    examples = wb.examples(args.client)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    bs = exp.train.batch_size
    batches = [wb.task.collate([examples[i] for i in order[s : s + bs]], wb.tokenizer) for s in range(0, len(order), bs)]
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    model = wb.model
    model.train()

    def step(batch, mode) -> float:
        t0 = time.perf_counter()
        if mode is None:
            loss = wb.task.loss(model, batch)
        else:
            with unpadded(model, first_token=mode):
                loss = wb.task.loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    modes = [None, False, True]
    total = {m: 0.0 for m in modes}
    for n in range(args.passes):
        for batch in batches:
            for mode in modes if n % 2 == 0 else modes[::-1]:
                total[mode] += step(batch, mode)
    print(f"{exp.name}, client {args.client}: {len(batches)} batches of {bs}, {real} real tokens of {padded} "
          f"padded positions ({real / padded:.3f}), {args.passes} passes, {args.threads} thread(s)")
    print(f"padded:                      {total[None]:.2f} s")
    print(f"unpadded:                    {total[False]:.2f} s  ratio {total[False] / total[None]:.3f}")
    print(f"unpadded, first-token last:  {total[True]:.2f} s  ratio {total[True] / total[None]:.3f}")


if __name__ == "__main__":
    main()
