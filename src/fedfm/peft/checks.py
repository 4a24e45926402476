"""Config-time checks of tuner settings that validate alone but cannot run with another
switch. Each takes an experiment and returns a message naming the field, or None.

``unpad_problem``: padding-free BERT (``train.unpad`` / ``eval.unpad``,
``learners/unpad.py``) recomputes each encoder layer itself: it calls the output
projections and their dropouts one by one and runs its own attention over the real
tokens. Bottleneck adapters (``adapter``, ``dual_adapter``) sit between a projection and
its dropout (the dropout moves into the adapter's wrapper), so the padding-free layer
finds no dropout where it expects one (an AttributeError in round 0, or every client
failing); prefix tuning hands each layer key/value prefixes that its attention does not
read (an IndexError). LoRA, IA3, BitFit, salience, sparse, prompt tuning and P-tuning wrap
or extend what the padding-free layers call, and run.
"""

from __future__ import annotations

# tuner -> why the padding-free encoder cannot run it
NOT_UNPADDED = {
    "adapter": "its adapters sit between BERT's output projections and their dropout, which the padding-free "
               "layers call one by one",
    "dual_adapter": "its adapters sit between BERT's output projections and their dropout, which the padding-free "
                    "layers call one by one",
    "prefix_tuning": "its key/value prefixes are not read by the padding-free attention",
}


def unpad_problem(exp) -> str | None:
    """Why ``peft.method`` cannot run on the padding-free encoder that ``train.unpad`` or
    ``eval.unpad`` turn on, or None."""
    why = NOT_UNPADDED.get(exp.peft.method)
    on = [f for f, v in (("train.unpad", exp.train.unpad), ("eval.unpad", exp.eval.unpad)) if v]
    if why is None or not on:
        return None
    return f"{on[0]}: peft.method {exp.peft.method} cannot run padding-free ({why}); turn {' and '.join(on)} off"
