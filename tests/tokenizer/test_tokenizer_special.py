"""Special tokens, BOS/EOS, end-of-generation and unused ids, metadata input and errors."""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np
import pytest

from tests.support.vocab import vocab_path
from worker_orcd.errors import ModelLoadError
from worker_orcd.tokenizer import Tokenizer
from worker_orcd.tokenizer.metadata import read_gguf_metadata


def test_qwen_special_text_is_plain_text_unless_parsed(qwen2_tok: Tokenizer) -> None:
    text = "<|im_start|>user\nHi<|im_end|>"
    assert qwen2_tok.encode(text, parse_special=True) == [151644, 872, 198, 13048, 151645]
    plain = qwen2_tok.encode(text)
    assert 151644 not in plain and 151645 not in plain
    assert plain[:6] == qwen2_tok.encode("<|im_start|>")  # '<', '|', 'im', '_start', '|', '>'
    assert qwen2_tok.decode(plain) == text
    assert qwen2_tok.decode(qwen2_tok.encode(text, parse_special=True)) == text
    assert (
        qwen2_tok.decode(qwen2_tok.encode(text, parse_special=True), skip_special=True)
        == "user\nHi"
    )


def test_phi3_special_tokens(phi3_tok: Tokenizer) -> None:
    text = "<|user|>\nHello<|end|>"
    parsed = phi3_tok.encode(text, add_special=False, parse_special=True)
    # Phi-3's special tokens swallow the whitespace after them; the next text gets the SPM dummy
    # prefix space (llama.cpp and the model's HF tokenizer agree).
    assert parsed == [32010, phi3_tok.token_to_id("▁Hello"), 32007]
    plain = phi3_tok.encode(text, add_special=False)
    assert not set(plain) & {32010, 32007}
    assert phi3_tok.decode(plain) == text


def test_llama_spm_bos_text_and_dummy_prefix_after_special(llama_spm_tok: Tokenizer) -> None:
    ids = llama_spm_tok.encode("Hi<s>there", add_special=False, parse_special=True)
    assert ids == [llama_spm_tok.token_to_id("▁Hi"), 1, llama_spm_tok.token_to_id("▁there")]
    assert llama_spm_tok.decode(ids) == "Hi<s>there"
    assert 1 not in llama_spm_tok.encode("<s>", add_special=False)


def test_bos_eos_flags(
    qwen2_tok: Tokenizer, phi3_tok: Tokenizer, llama_spm_tok: Tokenizer, qwen_model_tok: Tokenizer
) -> None:
    assert phi3_tok.add_bos and llama_spm_tok.add_bos
    assert not qwen2_tok.add_bos and not qwen_model_tok.add_bos
    assert phi3_tok.encode("Hello") == [1, 15043]
    assert phi3_tok.encode("Hello", add_special=False) == [15043]
    assert llama_spm_tok.encode("")[:1] == [1] and llama_spm_tok.encode("", add_special=False) == []
    assert qwen2_tok.encode("Hello") == qwen2_tok.encode("Hello", add_special=False) == [9707]
    assert (phi3_tok.bos_id, phi3_tok.eos_id) == (1, 32000)
    assert (qwen_model_tok.bos_id, qwen_model_tok.eos_id) == (151643, 151645)


def test_eog_ids(phi3_tok: Tokenizer, llama_spm_tok: Tokenizer, qwen_model_tok: Tokenizer) -> None:
    # llama.cpp's sets (test_tokenizer_attributes.py has the rules behind them)
    assert qwen_model_tok.eog_ids == {128247, 151643, 151645, 151662, 151663, 151664}
    assert qwen_model_tok.id_to_piece(151645) == "<|im_end|>"
    assert phi3_tok.eog_ids == {2, 32007, 32000}
    assert llama_spm_tok.eog_ids == {2}


def test_unused_ids(phi3_tok: Tokenizer, qwen_model_tok: Tokenizer) -> None:
    assert phi3_tok.vocab_size == 32064
    assert phi3_tok.unused_ids == tuple(range(32011, 32064))
    assert phi3_tok.id_to_piece(32011) == "[PAD32011]"
    assert qwen_model_tok.vocab_size == 151936
    assert qwen_model_tok.unused_ids == tuple(range(151665, 151936))


def test_properties_and_pieces(qwen2_tok: Tokenizer, phi3_tok: Tokenizer) -> None:
    assert (qwen2_tok.kind, qwen2_tok.pre) == ("gpt2", "qwen2")
    assert (phi3_tok.kind, phi3_tok.pre) == ("llama", "default")
    assert qwen2_tok.id_to_piece(1879) == "Ġworld" and qwen2_tok.token_to_id("Ġworld") == 1879
    assert phi3_tok.token_to_id("no such piece") is None
    with pytest.raises(ValueError, match="outside the vocabulary"):
        phi3_tok.decode([32064])


def test_from_metadata_mapping_equals_from_path(phi3_tok: Tokenizer) -> None:
    md = read_gguf_metadata(vocab_path("phi-3"))
    md = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in md.items()}
    tok = Tokenizer.from_gguf(md)
    text = "Hello world! 🦙 <|end|> 平方"
    for parse in (False, True):
        assert tok.encode(text, parse_special=parse) == phi3_tok.encode(text, parse_special=parse)
    assert tok.eog_ids == phi3_tok.eog_ids and tok.unused_ids == phi3_tok.unused_ids


def test_metadata_reader_agrees_with_gguf_reader() -> None:
    path = vocab_path("phi-3")
    ours = read_gguf_metadata(path)
    ref = gguf.GGUFReader(path)
    assert set(ours) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        got = ours[key]
        if isinstance(got, np.ndarray):
            np.testing.assert_array_equal(got, np.asarray(expected), err_msg=key)
        else:
            assert got == expected, key


def _metadata(**overrides: Any) -> dict[str, Any]:
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.token_type": [1, 1, 1],
        "tokenizer.ggml.merges": ["a b"],
    }
    md.update(overrides)
    return {k: v for k, v in md.items() if v is not None}


def test_tiny_vocab_from_mapping() -> None:
    tok = Tokenizer.from_gguf(_metadata())
    assert tok.encode("abab") == [2, 2] and tok.decode([2, 0]) == "aba"
    assert tok.bos_id is None and tok.eog_ids == frozenset()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.model": "bert"}, "'bert'"),
        ({"tokenizer.ggml.pre": "mystery"}, "'mystery' is not supported"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges is missing"),
        ({"tokenizer.ggml.merges": ["ab"]}, r"tokenizer.ggml.merges\[0\]"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "tokenizer.ggml.token_type has shape"),
        ({"tokenizer.ggml.eos_token_id": 7}, "tokenizer.ggml.eos_token_id = 7"),
        ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.scores is missing"),
    ],
)
def test_bad_metadata(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        Tokenizer.from_gguf(_metadata(**overrides))


def test_bad_files(tmp_path: Any) -> None:
    src = vocab_path("llama-spm").read_bytes()
    bad_magic = tmp_path / "magic.gguf"
    bad_magic.write_bytes(b"GGML" + src[4:])
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        Tokenizer.from_gguf(bad_magic)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(src[: len(src) // 2])
    with pytest.raises(ModelLoadError, match="truncated|past the end"):
        Tokenizer.from_gguf(truncated)
