"""Checks of the data settings against the model's own limits, before anything trains.

``data.max_length`` beyond the model's position table does not fail when it is set: it
fails later, inside the first forward pass of a long text, as a tensor-size mismatch that
names neither. These checks read only the model's config (config.json), so ``fedfm run``
can make them before the weights load; the tasks repeat them when they encode, so every
path (tests, Flower clients) is covered.
"""

from __future__ import annotations

from typing import Any

# Config attributes that hold a model's longest input, by model family.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def position_limit(config: Any) -> int | None:
    """The longest input the model's position table holds, or None when it has none."""
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(max_length: int, limit: int | None, where: str = "the model") -> None:
    if limit is not None and max_length > limit:
        raise ValueError(
            f"data.max_length={max_length} exceeds the model's max_position_embeddings={limit} "
            f"({where}); set data.max_length to at most {limit}"
        )


def model_limit(model_cfg: Any) -> tuple[int | None, str]:
    """(position limit, model directory) from config.json plus ``model.config_overrides``."""
    from transformers import AutoConfig

    from fedfm.tasks.loading import model_dir, quiet_transformers

    quiet_transformers()
    directory = model_dir(model_cfg)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {directory} has no config.json (a Hugging Face model directory is needed)")
    config = AutoConfig.from_pretrained(directory)
    for key, value in model_cfg.config_overrides.items():
        setattr(config, key, value)
    return position_limit(config), str(directory)


def validate_model_inputs(exp) -> None:
    """``data.max_length`` against the model's position limit, from its config alone."""
    limit, directory = model_limit(exp.model)
    check_max_length(exp.data.max_length, limit, directory)
