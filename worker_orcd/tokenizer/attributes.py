"""Token attributes and the end-of-generation set, derived from GGUF metadata as llama.cpp does.

The rules, in the order they apply, are listed in the `worker_orcd.tokenizer.tokenizer` docstring;
`derive` follows `llama_vocab::impl::load` (src/llama-vocab.cpp) step by step.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from worker_orcd.tokenizer import metadata as tt
from worker_orcd.tokenizer.metadata import VocabData

logger = logging.getLogger(__name__)


class Attr(enum.IntFlag):
    """llama.cpp's `llama_token_attr` bits (the ones a GGUF vocabulary can give rise to)."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    RSTRIP = 1 << 8


# Split off before tokenizing (CONTROL and UNKNOWN only when special tokens are parsed).
SPECIAL = Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN

_FROM_TOKEN_TYPE = {
    tt.NORMAL: Attr.NORMAL,
    tt.UNKNOWN: Attr.UNKNOWN,
    tt.CONTROL: Attr.CONTROL,
    tt.USER_DEFINED: Attr.USER_DEFINED,
    tt.UNUSED: Attr.UNUSED,
    tt.BYTE: Attr.BYTE,
}

# Tokens found by their text when the metadata does not name them; each becomes CONTROL.
BY_TEXT: dict[str, tuple[str, ...]] = {
    "eot": (
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    ),
    "eom": ("<|eom_id|>",),
    "fim_pre": (
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ),
    "fim_suf": (
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ),
    "fim_mid": (
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}

# Tokens that end generation by their text alone; each becomes CONTROL.
EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    }
)

# Always rendered as text: their attributes become exactly USER_DEFINED.
ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")

# Phi-3: special tokens swallow the whitespace after them, except these.
PHI3_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")


@dataclass(frozen=True, slots=True)
class VocabAttributes:
    attrs: np.ndarray  # int32 [V]: Attr bits per token
    eog_ids: frozenset[int]


def derive(vocab: VocabData, ids: Mapping[str, int]) -> VocabAttributes:
    """Attributes and end-of-generation ids of `vocab` (`ids`: token text -> id)."""
    tokens = vocab.tokens
    attrs = np.zeros(len(tokens), dtype=np.int32)  # UNDEFINED for token types we do not know
    for ttype, attr in _FROM_TOKEN_TYPE.items():
        attrs[vocab.types == ttype] = attr

    # 1. EOT, EOM and FIM tokens the metadata does not name, by text (lowest id on several).
    named = {"eot": vocab.eot_id, "eom": vocab.eom_id}
    named |= {f"fim_{kind}": tid for kind, tid in vocab.fim_ids.items()}
    found: dict[str, int | None] = {}
    for kind, texts in BY_TEXT.items():
        tid = named[kind]
        if tid is None:
            hits = [ids[t] for t in texts if t in ids]
            if hits:
                tid = min(hits)
                attrs[tid] |= Attr.CONTROL
        found[kind] = tid

    # 2. CONTROL tokens whose text contains "unused" are UNUSED.
    for tid in np.flatnonzero(attrs & Attr.CONTROL):
        if "unused" in tokens[tid]:
            attrs[tid] |= Attr.UNUSED

    # 3. The end-of-generation set: FIM pad/repo/file-separator, then tokens by text.
    eog = {tid for kind in ("fim_pad", "fim_rep", "fim_sep") if (tid := found[kind]) is not None}
    for text in EOG_TEXTS:
        tid = ids.get(text)
        if tid is not None:
            eog.add(tid)
            attrs[tid] |= Attr.CONTROL

    # 4. gpt-oss's structural tokens are always rendered.
    for text in ALWAYS_USER_DEFINED:
        if text in ids:
            attrs[ids[text]] = Attr.USER_DEFINED

    # 5. EOS, EOT and EOM always end generation.
    eog.update(i for i in (vocab.eos_id, found["eot"], found["eom"]) if i is not None)

    # 6. With <|return|> and <|call|> (o200k_harmony), or <|calls|> and <|flush|> (solar-open),
    #    <|end|> only ends a message: not EOG, USER_DEFINED.
    in_eog = {tokens[i] for i in eog}
    has_call = bool(in_eog & {"<|call|>", "<|calls|>"})
    if "<|end|>" in in_eog and has_call and in_eog & {"<|return|>", "<|flush|>"}:
        end = ids["<|end|>"]
        eog.discard(end)
        attrs[end] = Attr.USER_DEFINED

    # 7. With <|tool_response> (gemma4) or <|plamo:eos|>, </s> is an ordinary token.
    if "</s>" in in_eog and in_eog & {"<|tool_response>", "<|plamo:eos|>"}:
        s = ids["</s>"]
        eog.discard(s)
        attrs[s] = Attr.NORMAL

    # 8. Phi-3 (by general.name): every special token, and </s>, strips the whitespace after it,
    #    except <unk>, <s> and <|endoftext|>.
    name = (vocab.name or "").lower()
    if "phi-3" in name or "phi3" in name:
        attrs[(attrs & SPECIAL) != 0] |= Attr.RSTRIP
        if "</s>" in ids:
            attrs[ids["</s>"]] |= Attr.RSTRIP
        for text in PHI3_NO_RSTRIP:
            if text in ids:
                attrs[ids[text]] &= ~int(Attr.RSTRIP)

    logger.debug(
        "vocab attributes: %d special tokens, end of generation %s",
        int(np.count_nonzero(attrs & SPECIAL)),
        sorted(eog),
    )
    return VocabAttributes(attrs, frozenset(eog))
