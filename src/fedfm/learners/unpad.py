"""Padding-free training of BERT-family encoders (``train.unpad: true``; for the
workbench's evaluation, ``eval.unpad: true``; docs/speed.md).

A batch of reviews padded to its longest one is, on the quickstart, 45% padding: every
token-wise layer (the query, key, value and output projections, the feed-forward block,
the layer norms) spends that share of its arithmetic on positions whose results nothing
reads. This switch removes them, in the spirit of the "unpadding" of Zeng et al. 2022
("Boosting Distributed Training Performance of the Unpadded BERT Model") and of
padding-free transformer training (the ``cu_seqlens`` layout of FlashAttention's varlen
kernels, Dao et al. 2022): the encoder keeps the real tokens only, ``[T, H]`` instead of
``[B, L, H]``, and puts them back into the padded layout for the attention product alone,
where the padding mask already gives padded keys a weight of exactly 0.

The math is the model's own, term for term:

- a padded position is never a key with non-zero weight (its softmax weight is exactly 0),
  and only the first position (the pooler's) or masked-out positions are read by the
  task heads, so dropping the padded rows removes nothing a real token depends on, in the
  forward or the backward pass;
- dropout masks are drawn exactly as the unpadded model draws them: one Bernoulli draw of
  the full padded shape per dropout, from the same generator, in the same order (the
  embeddings' and the attention's dropout run on the padded layout as before; the two
  hidden-state dropouts of each layer draw the padded-shape mask and keep its real rows).
  So the seeded training sees the same masks;
- what changes is float rounding: a weight gradient is a sum over the batch's tokens, and
  a sum over T rows rounds differently from one over B*L rows with zeros among them.
  Results agree with the padded model to float rounding, not bit for bit
  (tests/test_unpad.py; docs/speed.md for the figures on the full quickstart).

When the head reads the first token only (transformers' BertForSequenceClassification:
its pooler takes position 0), the LAST layer goes one step further: it computes keys and
values for every real token, and the query, the attention output and the feed-forward
block for the first token of each sequence only (its attention written out as
transformers' eager attention, with the dropout mask drawn over the full shape and row 0
kept). Its forward pass then agrees with the padded model's to float rounding (5e-8 on
MiniLM's logits), with the same masks. The encoder's output is then zero everywhere but
position 0; a call that asks for hidden states or attentions takes the padded path. A batch
without padding takes the model's own path too, unless its last layer computes the first
token only (the longest evaluation batches, all cut at ``data.max_length``, still save
that layer's work).

Written by hand because neither transformers (its padding-free path needs FlashAttention
kernels, GPU only, and a packed collator) nor peft offers unpadded training of a BERT
encoder on the CPU. Supported: ``BertModel`` encoders (BERT, MiniLM) without cross
attention or feed-forward chunking; other models are refused when the model loads.
"""

from __future__ import annotations

import torch
from torch import nn

UNPAD_PROBLEM = "{field}: true supports BERT-family encoders (transformers' BertModel) only"


def find_bert(model: nn.Module) -> nn.Module | None:
    """The model's BertModel, or None."""
    from transformers.models.bert.modeling_bert import BertModel

    for module in model.modules():
        if isinstance(module, BertModel):
            return module
    return None


def unpad_problem(model: nn.Module, field: str = "train.unpad") -> str | None:
    """Why padding-free computation (the switch ``field``) cannot run on this model; None when it can."""
    head = UNPAD_PROBLEM.format(field=field)
    bert = find_bert(model)
    if bert is None:
        return f"{head}; model {type(model).__name__} has none: set {field}: false"
    cfg = bert.config
    if cfg.is_decoder or getattr(cfg, "add_cross_attention", False):
        return f"{head} without decoder or cross attention; set {field}: false"
    if getattr(cfg, "chunk_size_feed_forward", 0):
        return f"{head} without feed-forward chunking (chunk_size_feed_forward is {cfg.chunk_size_feed_forward})"
    return None


def _noise(shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p)) torch draws for a tensor of ``shape``."""
    if like.device.type != "cpu":
        # CUDA and other accelerators use the fused kernel, whose mask depends on the
        # generator's offset and the element's index only.
        return torch.native_dropout(torch.ones(shape, dtype=like.dtype, device=like.device), p, True)[0]
    noise = torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p)
    return noise.div_(1 - p)


def _dropout(x: torch.Tensor, module: nn.Dropout, rows: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """``module(x_padded)[rows]`` with x's real rows only: the padded-shape mask, its real rows kept.

    torch's CPU dropout is ``input * (empty_like(input).bernoulli_(1 - p) / (1 - p))``;
    the same draw of the padded shape gives the same mask values, element for element.
    On CUDA the fused kernel's mask is drawn on a padded tensor of ones instead (written
    for the same property; not yet run on a GPU).
    """
    p = module.p
    if not module.training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    return x * _noise((padded_rows, x.shape[-1]), p, x).index_select(0, rows)


def _to_padded(x: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """[T, D] real rows -> [B, L, D], zeros at the padded positions."""
    b, l = shape
    return x.new_zeros((b * l, x.shape[-1])).index_copy(0, rows, x).view(b, l, x.shape[-1])


def _layer(layer: nn.Module, x: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int], mask, kwargs) -> torch.Tensor:
    """One BertLayer on the real rows ``x`` [T, H] (transformers' BertLayer.forward, unpadded)."""
    from transformers.models.bert.modeling_bert import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

    sa = layer.attention.self
    b, l = shape
    heads = (b, l, -1, sa.attention_head_size)
    q = _to_padded(sa.query(x), rows, shape).view(heads).transpose(1, 2)
    k = _to_padded(sa.key(x), rows, shape).view(heads).transpose(1, 2)
    v = _to_padded(sa.value(x), rows, shape).view(heads).transpose(1, 2)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager_attention_forward)
    out, _ = attend(sa, q, k, v, mask, dropout=0.0 if not sa.training else sa.dropout.p, scaling=sa.scaling, **kwargs)
    out = out.reshape(b * l, -1).index_select(0, rows)
    so = layer.attention.output
    h = so.LayerNorm(_dropout(so.dense(out), so.dropout, rows, b * l) + x)
    o = layer.output
    return o.LayerNorm(_dropout(o.dense(layer.intermediate(h)), o.dropout, rows, b * l) + h)


def _first_token_layer(layer: nn.Module, x: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int], mask) -> torch.Tensor:
    """The LAST BertLayer for a head that reads the first token only: keys and values of
    every real token, everything else for the first token of each sequence; returns [B, H].

    The attention is written out as transformers' eager attention (scores, mask, softmax,
    dropout, values) for one query per sequence; its dropout mask is drawn over the full
    [B, heads, L, L] shape, as the padded model's attention draws it, and row 0 is kept.
    """
    sa = layer.attention.self
    b, l = shape
    first = (rows % l == 0).nonzero().squeeze(1)  # the rows of x that are position 0
    cls = torch.arange(b, device=x.device) * l  # their rows in the padded layout
    heads = (b, l, -1, sa.attention_head_size)
    q = sa.query(x.index_select(0, first)).view(b, 1, -1, sa.attention_head_size).transpose(1, 2)  # (B, nh, 1, hd)
    k = _to_padded(sa.key(x), rows, shape).view(heads).transpose(1, 2)  # (B, nh, L, hd)
    v = _to_padded(sa.value(x), rows, shape).view(heads).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(2, 3)) * sa.scaling  # (B, nh, 1, L)
    if mask is not None:
        row = mask[..., :1, :]
        scores = scores.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else scores + row
    probs = torch.softmax(scores, dim=-1)
    p = sa.dropout.p
    if sa.training and p > 0.0:
        probs = probs * _noise((b, q.shape[1], l, l), p, probs)[:, :, :1, :]
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, -1)  # (B, H)
    so = layer.attention.output
    h = so.LayerNorm(_dropout(so.dense(out), so.dropout, cls, b * l) + x.index_select(0, first))
    o = layer.output
    return o.LayerNorm(_dropout(o.dense(layer.intermediate(h)), o.dropout, cls, b * l) + h)


def reads_first_token_only(model: nn.Module, bert: nn.Module) -> bool:
    """Whether the model's head reads the first token of ``bert``'s output only
    (transformers' BertForSequenceClassification: the pooler's first token)."""
    from transformers.models.bert.modeling_bert import BertForSequenceClassification

    return any(isinstance(m, BertForSequenceClassification) and m.bert is bert for m in model.modules()) \
        and bert.pooler is not None


class unpadded:  # noqa: N801 - used like a function: ``with unpadded(model): ...``
    """Within the block, the model's BERT encoder computes on real tokens only (re-enterable)."""

    def __init__(self, model: nn.Module, first_token: bool | None = None):
        problem = unpad_problem(model)
        if problem is not None:
            raise ValueError(problem)
        self.bert = find_bert(model)
        # The last layer computes the first token only when the head reads nothing else.
        self.first_token = reads_first_token_only(model, self.bert) if first_token is None else first_token
        self.mask: torch.Tensor | None = None

    def __enter__(self) -> "unpadded":
        bert, encoder = self.bert, self.bert.encoder
        bert_forward, encoder_forward = bert.forward, encoder.forward

        def bert_patched(*args, **kwargs):
            wants_more = kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
            self.mask = None if wants_more else kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            try:
                return bert_forward(*args, **kwargs)
            finally:
                self.mask = None

        def encoder_patched(hidden_states, attention_mask=None, *args, **kwargs):
            keep = self.mask
            # a batch without padding saves nothing unless the last layer computes the first token only
            if keep is None or args or kwargs.get("encoder_hidden_states") is not None \
                    or (bool(keep.all()) and not self.first_token):
                return encoder_forward(hidden_states, attention_mask, *args, **kwargs)
            return self._encode(hidden_states, attention_mask, keep, kwargs)

        bert.forward, encoder.forward = bert_patched, encoder_patched
        return self

    def __exit__(self, *exc) -> None:
        del self.bert.forward, self.bert.encoder.forward  # back to the classes' methods

    def _encode(self, hidden_states: torch.Tensor, attention_mask, keep: torch.Tensor, kwargs: dict):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        for name in ("encoder_hidden_states", "encoder_attention_mask", "cache", "use_cache"):
            kwargs.pop(name, None)
        b, l, h = hidden_states.shape
        rows = keep.reshape(-1).nonzero().squeeze(1)  # real tokens, in (batch, position) order
        x = hidden_states.reshape(b * l, h).index_select(0, rows)
        layers = list(self.bert.encoder.layer)
        first = self.first_token and bool(keep[:, 0].all())  # right-padded: position 0 is real
        for layer in layers[:-1] if first else layers:
            x = _layer(layer, x, rows, (b, l), attention_mask, kwargs)
        if first:  # only the first token of the last layer is read: [B, H] at position 0
            out = hidden_states.new_zeros((b, l, h))
            out[:, 0] = _first_token_layer(layers[-1], x, rows, (b, l), attention_mask)
            return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=_to_padded(x, rows, (b, l)))
