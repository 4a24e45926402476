"""Client training memory of split learning (the bottom part only) against the whole model.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/split_memory.py [--config YAML] [--cuts 1,2,3] \
        [--batch 8] [--set key=value ...]

For a model (a config's, default the reduced heterogeneous job's tiny BERT) and one
training batch of the config's data, it measures one local step:

- ``whole``: a client that trains the whole model (forward, loss, backward, AdamW step);
- ``cut k``: a SplitFed client at cut ``k`` (``learners/splitfed.py``): it holds the
  embeddings and the first k layers only; forward up to the cut, backward of the
  activations' gradient received from the server, AdamW step on its own trainable tensors.

On CPU, where PyTorch keeps no allocator peak, the figure is a tensor account, each part
measured on the step itself: the weights the client holds, the gradients and the two
AdamW moments of its trainable tensors (after the step), the activations autograd saves
for the backward (every tensor ``saved_tensors_hooks`` sees, distinct storages,
parameters excluded) and, for a split client, the activations it sends and the gradient
it receives. It leaves out transient buffers inside the kernels and the framework's own
memory, so it is a lower bound of the process's peak, computed alike for every row. On a
CUDA device, ``--device cuda`` also reports the allocator's peak
(``torch.cuda.max_memory_allocated``) with only the held modules on the device.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class SavedTensors:
    """Bytes of the distinct storages autograd saves for the backward, parameters excluded."""

    def __init__(self, params):
        self.skip = {storage_key(p)[0] for p in params}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        ptr, n = storage_key(t)
        if ptr not in self.skip:
            self.seen[ptr] = max(self.seen.get(ptr, 0), n)
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.seen.values())


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def held_modules(parts, cut: int | None) -> list[torch.nn.Module]:
    if cut is None:
        return [parts.model]
    return [parts.bert.embeddings, *parts.layers[:cut]]


def measure(model, task, batch: dict, cut: int | None, lr: float = 1e-3, device: str = "cpu") -> dict:
    """One training step's memory account (bytes) of a whole-model (``cut=None``) or a
    split client at ``cut``."""
    from fedfm.learners.split import bert_parts, client_forward

    parts = bert_parts(model)
    modules = held_modules(parts, cut)
    held = {id(p): p for m in modules for p in m.parameters()}
    trainable = [p for p in held.values() if p.requires_grad]
    if device != "cpu":
        for m in modules:
            m.to(device)
        batch = {k: v.to(device) for k, v in batch.items()}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    opt = torch.optim.AdamW(trainable, lr=lr)
    model.train()
    saved = SavedTensors(held.values())
    io = 0
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        if cut is None:
            loss = task.loss(model, batch)
            loss.backward()
        else:
            h = client_forward(parts, batch, cut)  # (B, T, H): sent to the server
            grad = torch.randn(h.shape, generator=torch.Generator().manual_seed(0)).to(h.device, h.dtype)  # dL/dh as received
            io = 2 * h.numel() * h.element_size()
            h.backward(grad)
    opt.step()
    model.eval()
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    out = {
        "weights": nbytes(held.values()),
        "grads": nbytes(trainable),
        "adam_moments": moments,
        "saved_activations": saved.nbytes,
        "io": io,
    }
    out["total"] = sum(out.values())
    if device != "cpu":
        torch.cuda.synchronize()
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
        for m in modules:
            m.to("cpu")
    opt.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    return out


def workbench(config: Path, overrides: list[str]):
    from fedfm.config import load_config
    from fedfm.runtime.workbench import Workbench

    return Workbench(load_config(config, overrides=overrides))


def client_memory(wb, cuts: list[int], batch_size: int, device: str = "cpu") -> dict:
    """{"whole": account, "cut k": account} on the first ``batch_size`` examples of client 0."""
    items = wb.examples(0)[:batch_size]
    batch = wb.task.collate(items, wb.tokenizer)
    rows = {"whole": measure(wb.model, wb.task, batch, None, device=device)}
    for c in cuts:
        rows[f"cut {c}"] = measure(wb.model, wb.task, batch, c, device=device)
    rows["shape"] = list(batch["input_ids"].shape)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "heterogeneous" / "splitfed.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    ap.add_argument("--reduced", action="store_true", help="the reduced heterogeneous job (benchmarks/heterogeneous.py)")
    ap.add_argument("--cuts", default="1,2,3")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    overrides = list(args.set)
    if args.reduced:
        import heterogeneous as het

        het.make_toy_data()
        overrides = het.REDUCED + [het.reduced_roles("splitfed_multicut")] + overrides
    wb = workbench(args.config, overrides)
    rows = client_memory(wb, [int(c) for c in args.cuts.split(",") if c], args.batch, args.device)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
