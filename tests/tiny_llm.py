"""A tiny causal LM directory for tests: random-init Llama config + character tokenizer.

The tokenizer maps every character to one token and each chat marker to one token, so
token counts (and label masks) can be checked by hand: ``"<|im_start|>user\\nHi"`` is
1 + 7 tokens.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pandas as pd

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) | set("äöüßéèàñçąęłśćżźčřšžýáíúůőΩ"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    vocab["<unk>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_llm_dir(path: Path) -> Path:
    """config.json (Llama, random init) + tokenizer files in ``path``."""
    from transformers import LlamaConfig

    path = Path(path)
    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer()
    tok.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        **TINY_LLAMA,
    )
    config.save_pretrained(path)
    return path


def make_toy_text(path: Path, n: int = 240, seed: int = 0) -> None:
    """Short repetitive sentences, 12 authors (groups): easy to learn, so the loss falls."""
    rng = np.random.default_rng(seed)
    subjects = ["the cat", "a dog", "my friend", "the king"]
    verbs = ["sat on", "looked at", "ran to", "sang for"]
    objects = ["the mat", "the moon", "a tree", "the queen"]
    rows = [
        {
            "text": f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.",
            "group": f"a{i % 12}",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tiny_llm_config(tmp_path) -> dict:
    """A raw experiment dict for the causal LM task on the tiny model and toy text."""
    model_dir = make_tiny_llm_dir(tmp_path / "tiny-llm")
    data = tmp_path / "toy.jsonl"
    if not data.exists():
        make_toy_text(data)
    return {
        "name": "tiny-llm",
        "seed": 0,
        "rounds": 2,
        "model": {"task": "causal_lm", "path": str(model_dir), "init": "random"},
        "data": {"source": "jsonl", "path": str(data), "group_column": "group", "max_length": 48},
        "federation": {"clients": 2, "partitioner": {"name": "natural"}, "test_examples": 40, "examples_per_client": 48},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"lr": 0.02, "batch_size": 8, "epochs": 2},
        # One thread: a model this small only loses to thread synchronisation.
        "runtime": {"progress": False},
    }


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)
