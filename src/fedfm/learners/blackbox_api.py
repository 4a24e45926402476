"""An inference-only API over the one base model, for black-box learners (FedBPT; BDPL's
token-id API, ``learners/bdpl.make_token_api``, shares ``InferenceAPI`` and ``served``).

A model owner who will not hand out weights offers a service: send prompt embeddings and
a batch, get back the loss or the logits. ``InferenceAPI`` is that service in process: it
holds no attribute that leads to the model, answers under ``torch.no_grad`` with detached
copies, and puts the stored prompt back after every call, so a learner given only this
object cannot read or change a parameter or obtain a gradient. (Python cannot make a
closure's cells truly private; across machines the boundary is the network. What the tests
check is that nothing reachable through the object's attributes is a module, a parameter
or a tensor that requires grad.)
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class InferenceAPI:
    __slots__ = ("_loss", "_logits", "prompt_shape", "calls")

    def __init__(self, loss: Callable, logits: Callable, prompt_shape: tuple[int, ...]):
        object.__setattr__(self, "_loss", loss)
        object.__setattr__(self, "_logits", logits)
        object.__setattr__(self, "prompt_shape", tuple(prompt_shape))
        object.__setattr__(self, "calls", [0])

    def __setattr__(self, name, value):
        raise AttributeError("the inference API is read-only")

    def loss(self, prompt: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
        """The task loss of ``batch`` with the soft prompt set to ``prompt`` (one forward)."""
        self.calls[0] += 1
        return float(self._loss(prompt, batch))

    def logits(self, prompt: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, classes) for a classifier; (B, T, V) for a causal LM, the sequence's own
        positions (each conditioned on the prompt), without the virtual tokens'."""
        self.calls[0] += 1
        return self._logits(prompt, batch)


def served(model: torch.nn.Module, swap: Callable[[], Callable[[], None]], fn: Callable):
    """The provider answering one call: ``swap()`` puts the caller's prompt in place and
    returns what takes it out again (run whatever happens); ``fn`` runs in eval mode
    without gradients."""
    undo = swap()
    try:
        model.eval()
        with torch.no_grad():
            return fn()
    finally:
        undo()


def make_inference_api(model: torch.nn.Module, task: Any, prompt_name: str) -> InferenceAPI:
    """The provider's side: wraps ``model`` so that only the prompt can be varied."""
    param = dict(model.named_parameters())[prompt_name]
    shape = tuple(param.shape)

    def with_prompt(prompt: torch.Tensor, fn):
        if tuple(prompt.shape) != shape:
            raise ValueError(f"prompt has shape {tuple(prompt.shape)}, expected {shape}")

        def swap():
            saved = param.data
            param.data = prompt.detach().to(saved.device, saved.dtype).clone()
            return lambda: setattr(param, "data", saved)

        return served(model, swap, fn)

    def loss(prompt, batch):
        return with_prompt(prompt, lambda: task.loss(model, batch).item())

    def logits(prompt, batch):
        out = with_prompt(prompt, lambda: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
        if out.ndim == 3:  # a causal LM: the sequence's own positions, not the prepended virtual tokens'
            out = out[:, out.shape[1] - batch["input_ids"].shape[1]:]
        return out.detach().float().clone()

    return InferenceAPI(loss, logits, shape)
