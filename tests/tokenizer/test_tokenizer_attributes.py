"""Token attributes and end-of-generation ids derived as llama.cpp's vocab loader derives them.

The real vocabularies pin what llama.cpp does with them; small vocabularies given as metadata
mappings pin each rule of `worker_orcd.tokenizer.attributes` on its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.support.vocab import vocab_path
from worker_orcd.tokenizer import Tokenizer
from worker_orcd.tokenizer.attributes import Attr
from worker_orcd.tokenizer.metadata import (
    CONTROL,
    NORMAL,
    USER_DEFINED,
    VocabData,
    read_gguf_metadata,
)

A = Attr


def test_qwen_coder_end_of_sentence_is_special_and_ends_generation(
    qwen_model_tok: Tokenizer,
) -> None:
    tok = qwen_model_tok
    assert tok.id_to_piece(128247) == "</s>"
    assert tok.token_attr(128247) == A.NORMAL | A.CONTROL  # NORMAL in the file
    assert tok.encode("a</s>b", parse_special=True) == [64, 128247, 65]
    assert tok.encode("a</s>b") == [64, 522, 82, 51407]  # 'a', '</', 's', '>b'
    assert 128247 in tok.eog_ids and 128247 in tok.special_ids
    assert tok.decode([64, 128247, 65]) == "a</s>b"
    assert tok.decode([64, 128247, 65], skip_special=True) == "ab"


def test_qwen_coder_eog_and_fim_tokens(qwen_model_tok: Tokenizer) -> None:
    tok = qwen_model_tok
    eog = {tok.id_to_piece(i): i for i in tok.eog_ids}
    assert eog == {
        "</s>": 128247,
        "<|endoftext|>": 151643,
        "<|im_end|>": 151645,  # also tokenizer.ggml.eos_token_id
        "<|fim_pad|>": 151662,
        "<|repo_name|>": 151663,  # FIM repo
        "<|file_sep|>": 151664,  # FIM file separator
    }
    for tid in (151659, 151660, 151661):  # FIM prefix, middle, suffix: control, not EOG
        assert tok.token_attr(tid) == A.CONTROL and tid not in tok.eog_ids
    assert tok.token_attr(151657) == A.USER_DEFINED  # <tool_call>: split even unparsed
    assert tok.encode("x<tool_call>") == [87, 151657]
    assert tok.token_attr(151665) == A.UNUSED  # [PAD151665]
    assert tok.token_attr(128244) == A.NORMAL  # <unk>: only the EOG texts are promoted


def test_phi3_end_of_sentence_is_text_unless_parsed(phi3_tok: Tokenizer) -> None:
    tok = phi3_tok
    assert tok.token_attr(2) == A.USER_DEFINED | A.CONTROL | A.RSTRIP  # USER_DEFINED in the file
    assert tok.encode("Hello</s>", add_special=False) == [15043, 829, 29879, 29958]
    assert [tok.id_to_piece(i) for i in (829, 29879, 29958)] == ["</", "s", ">"]
    assert tok.encode("Hello</s>", add_special=False, parse_special=True) == [15043, 2]
    there = tok.token_to_id("▁there")
    assert tok.encode("Hello</s> \n there", add_special=False, parse_special=True) == [
        15043,
        2,
        there,
    ]
    assert tok.eog_ids == {2, 32000, 32007}  # </s>, <|endoftext|> (EOS), <|end|>


def test_phi3_rstrip_attributes(phi3_tok: Tokenizer) -> None:
    rstrip = [i for i in range(phi3_tok.vocab_size) if phi3_tok.token_attr(i) & A.RSTRIP]
    # every special token (<|assistant|> .. <|user|>, the UNKNOWN [PAD] tokens, </s>) but
    # <unk>, <s> and <|endoftext|>
    assert rstrip == [2, *range(32001, 32064)]
    assert (
        phi3_tok.token_attr(0) == A.CONTROL and phi3_tok.token_attr(32011) == A.UNKNOWN | A.RSTRIP
    )


def test_other_vocabularies(qwen2_tok: Tokenizer, llama_spm_tok: Tokenizer) -> None:
    assert qwen2_tok.eog_ids == {128247, 151643, 151645}
    assert qwen2_tok.token_attr(151646) == A.USER_DEFINED  # [PAD151646]
    assert llama_spm_tok.eog_ids == {2}
    assert [llama_spm_tok.token_attr(i) for i in (0, 1, 2)] == [A.UNKNOWN, A.CONTROL, A.CONTROL]
    assert not any(llama_spm_tok.token_attr(i) & A.RSTRIP for i in range(3))  # not Phi-3


# llama.cpp's `llama_vocab_get_attr` for every token that is not plain NORMAL, and its
# `llama_vocab_is_eog` set, recorded with llama-cpp-python 0.3.36 (llama.cpp 0c1e5709) loading
# each file vocab-only: attribute -> inclusive id ranges.
LLAMA_CPP = {
    "qwen_model_tok": (
        {
            A.NORMAL | A.CONTROL: [(128247, 128247)],
            A.CONTROL: [(151643, 151656), (151659, 151664)],
            A.USER_DEFINED: [(151657, 151658)],
            A.UNUSED: [(151665, 151935)],
        },
        {128247, 151643, 151645, 151662, 151663, 151664},
    ),
    "phi3_tok": (
        {
            A.CONTROL: [(0, 1), (32000, 32000)],
            A.USER_DEFINED | A.CONTROL | A.RSTRIP: [(2, 2)],
            A.BYTE: [(3, 258)],
            A.CONTROL | A.RSTRIP: [(32001, 32010)],
            A.UNKNOWN | A.RSTRIP: [(32011, 32063)],
        },
        {2, 32000, 32007},
    ),
    "qwen2_tok": (
        {
            A.NORMAL | A.CONTROL: [(128247, 128247)],
            A.CONTROL: [(151643, 151645)],
            A.USER_DEFINED: [(151646, 151935)],
        },
        {128247, 151643, 151645},
    ),
    "llama_spm_tok": (
        {A.UNKNOWN: [(0, 0)], A.CONTROL: [(1, 2)], A.BYTE: [(3, 258)]},
        {2},
    ),
}


@pytest.mark.parametrize("name", sorted(LLAMA_CPP))
def test_attributes_and_eog_match_llama_cpp(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    ranges, eog = LLAMA_CPP[name]
    expected = np.full(tok.vocab_size, int(A.NORMAL))
    for attr, spans in ranges.items():
        for first, last in spans:
            expected[first : last + 1] = int(attr)
    ours = np.array([int(tok.token_attr(i)) for i in range(tok.vocab_size)])
    differ = np.flatnonzero(ours != expected)
    assert differ.size == 0, [(int(i), tok.id_to_piece(int(i)), ours[i]) for i in differ[:10]]
    assert tok.eog_ids == eog


# (tokenizer, text, llama_tokenize ids without / with parse_special), no BOS, recorded likewise.
LLAMA_CPP_CASES = [
    ("qwen_model_tok", "a</s>b", [64, 522, 82, 51407], [64, 128247, 65]),
    ("qwen_model_tok", "Hello</s>", [9707, 522, 82, 29], [9707, 128247]),
    ("qwen_model_tok", "</s>", [522, 82, 29], [128247]),
    (
        "qwen_model_tok",
        "Hello</s> \n there",
        [9707, 522, 82, 29, 715, 1052],
        [9707, 128247, 715, 1052],
    ),
    (
        "qwen_model_tok",
        "<|user|>\nHi",
        [27, 91, 872, 91, 397, 13048],
        [27, 91, 872, 91, 397, 13048],
    ),
    ("qwen_model_tok", "x<tool_call>", [87, 151657], [87, 151657]),
    (
        "qwen_model_tok",
        "<|fim_prefix|>def f():<|fim_suffix|>",
        [27, 91, 69, 318, 13974, 91, 29, 750, 282, 4555, 27, 91, 69, 318, 37151, 91, 29],
        [151659, 750, 282, 4555, 151661],
    ),
    ("phi3_tok", "a</s>b", [263, 829, 29879, 29958, 29890], [263, 2, 289]),
    ("phi3_tok", "Hello</s>", [15043, 829, 29879, 29958], [15043, 2]),
    ("phi3_tok", "</s>", [1533, 29879, 29958], [2]),
    ("phi3_tok", "Hello</s> \n there", [15043, 829, 29879, 29958, 29871, 13, 727], [15043, 2, 727]),
    ("phi3_tok", "<|user|>\nHi", [529, 29989, 1792, 29989, 29958, 13, 18567], [32010, 6324]),
    ("qwen2_tok", "a</s>b", [64, 522, 82, 51407], [64, 128247, 65]),
    ("qwen2_tok", "Hello</s>", [9707, 522, 82, 29], [9707, 128247]),
    ("qwen2_tok", "</s>", [522, 82, 29], [128247]),
    ("qwen2_tok", "Hello</s> \n there", [9707, 522, 82, 29, 715, 1052], [9707, 128247, 715, 1052]),
    ("qwen2_tok", "<|user|>\nHi", [27, 91, 872, 91, 397, 13048], [27, 91, 872, 91, 397, 13048]),
    ("qwen2_tok", "x<tool_call>", [87, 27, 14172, 13429, 29], [87, 27, 14172, 13429, 29]),
    ("llama_spm_tok", "a</s>b", [263, 829, 29879, 29958, 29890], [263, 2, 289]),
    ("llama_spm_tok", "Hello</s>", [15043, 829, 29879, 29958], [15043, 2]),
    ("llama_spm_tok", "</s>", [1533, 29879, 29958], [2]),
    (
        "llama_spm_tok",
        "Hello</s> \n there",
        [15043, 829, 29879, 29958, 29871, 13, 727],
        [15043, 2, 259, 13, 727],
    ),
    (
        "llama_spm_tok",
        "<|user|>\nHi",
        [529, 29989, 1792, 29989, 29958, 13, 18567],
        [529, 29989, 1792, 29989, 29958, 13, 18567],
    ),
]


@pytest.mark.parametrize(("name", "text", "plain", "special"), LLAMA_CPP_CASES)
def test_special_text_splits_as_in_llama_cpp(
    name: str, text: str, plain: list[int], special: list[int], request: pytest.FixtureRequest
) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    assert tok.encode(text, add_special=False) == plain
    assert tok.encode(text, add_special=False, parse_special=True) == special


# -- the rules one by one, on small vocabularies ---------------------------------------------------


def _tok(tokens: list[str], types: list[int] | None = None, **metadata: Any) -> Tokenizer:
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": ["a", "b", *tokens],
        "tokenizer.ggml.token_type": [NORMAL, NORMAL, *(types or [NORMAL] * len(tokens))],
        "tokenizer.ggml.merges": [],
    }
    md |= {f"tokenizer.ggml.{k}": v for k, v in metadata.items()}
    return Tokenizer.from_gguf(md)


def test_eog_texts_become_control() -> None:
    tok = _tok(["<|im_end|>", "<|eot_id|>", "<|im_start|>"])
    assert tok.eog_ids == {2, 3}
    assert [tok.token_attr(i) for i in (2, 3, 4)] == [A.NORMAL | A.CONTROL] * 2 + [A.NORMAL]
    assert tok.encode("a<|im_end|>b", parse_special=True) == [0, 2, 1]


def test_eos_eot_eom_ids_from_metadata_end_generation() -> None:
    tok = _tok(["x", "y", "z"], eos_token_id=2, eot_token_id=3, eom_token_id=4)
    assert tok.eog_ids == {2, 3, 4}
    assert all(tok.token_attr(i) == A.NORMAL for i in (2, 3, 4))  # named, so not promoted


def test_fim_tokens_by_text() -> None:
    texts = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>"]
    tok = _tok([*texts, "<|fim_repo|>", "<|file_sep|>", "<PRE>"])
    assert tok.eog_ids == {5, 6, 7}  # pad, repo, file separator
    assert all(tok.token_attr(i) == A.NORMAL | A.CONTROL for i in range(2, 8))
    assert tok.token_attr(8) == A.NORMAL  # a second prefix text: the first (lowest id) wins


def test_fim_ids_from_metadata_win_over_text() -> None:
    tok = _tok(["<|fim_pad|>", "pad", "<|fim_prefix|>"], fim_pad_token_id=3, prefix_token_id=2)
    assert tok.eog_ids == {3}  # the named pad token, not the one that looks like it
    assert tok.token_attr(2) == A.NORMAL and tok.token_attr(4) == A.NORMAL
    # the older prefix/suffix/middle keys win over fim_pre/suf/mid, as in llama.cpp
    md = {"tokenizer.ggml.fim_pre_token_id": 2, "tokenizer.ggml.prefix_token_id": 3}
    md |= {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b", "c", "d"]}
    md["tokenizer.ggml.scores"] = [0.0] * 4
    assert VocabData.from_metadata(md).fim_ids == dict.fromkeys(
        ("pre", "suf", "mid", "pad", "rep", "sep")
    ) | {"pre": 3}


def test_control_tokens_named_unused_are_unused() -> None:
    tok = _tok(["<unused0>", "<unused1>"], [CONTROL, NORMAL])
    assert tok.token_attr(2) == A.CONTROL | A.UNUSED
    assert tok.token_attr(3) == A.NORMAL
    assert 2 in tok.unused_ids and 3 not in tok.unused_ids


def test_always_rendered_tokens_are_user_defined() -> None:
    tok = _tok(["<|start|>", "<|channel|>"], [CONTROL, CONTROL])
    assert tok.token_attr(2) == tok.token_attr(3) == A.USER_DEFINED
    assert tok.encode("a<|start|>b") == [0, 2, 1]  # split without parse_special


@pytest.mark.parametrize(
    ("extra", "end_is_eog"),
    [
        ([], True),
        (["<|return|>"], True),
        (["<|return|>", "<|call|>"], False),
        (["<|calls|>", "<|flush|>"], False),
    ],
)
def test_end_is_not_eog_beside_return_and_call(extra: list[str], end_is_eog: bool) -> None:
    tok = _tok(["<|end|>", *extra])
    assert (2 in tok.eog_ids) is end_is_eog
    assert tok.token_attr(2) == (A.NORMAL | A.CONTROL if end_is_eog else A.USER_DEFINED)
    assert set(range(3, 3 + len(extra))) <= tok.eog_ids


def test_end_of_sentence_is_normal_beside_tool_response() -> None:
    assert _tok(["</s>"]).eog_ids == {2}
    tok = _tok(["</s>", "<|tool_response>"])
    assert tok.eog_ids == {3} and tok.token_attr(2) == A.NORMAL


def _phi3_metadata(name: str) -> dict[str, Any]:
    md = read_gguf_metadata(vocab_path("phi-3"), prefixes=("tokenizer.", "general."))
    md = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in md.items()}
    md["general.name"] = name
    return md


@pytest.mark.parametrize(
    ("name", "strips"), [("Phi3", True), ("phi-3-mini", True), ("Phi 3 Mini", False), ("x", False)]
)
def test_phi3_rstrip_follows_the_model_name(name: str, strips: bool) -> None:
    tok = Tokenizer.from_gguf(_phi3_metadata(name))
    ids = tok.encode("<|user|>\nHi", add_special=False, parse_special=True)
    assert ids[0] == 32010
    assert (tok.decode(ids) == "<|user|>Hi") is strips
    assert bool(tok.token_attr(32010) & A.RSTRIP) is strips
    assert not tok.token_attr(32000) & A.RSTRIP  # <|endoftext|> never strips


def test_user_defined_type_is_kept() -> None:
    tok = _tok(["<x>"], [USER_DEFINED])
    assert tok.token_attr(2) == A.USER_DEFINED and tok.eog_ids == frozenset()
