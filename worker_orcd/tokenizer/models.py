"""Builders for the two GGUF tokenizer kinds on top of the `tokenizers` library.

Both return a `tokenizers.Tokenizer` without added tokens: special-token text is split off
beforehand by `Tokenizer._partition`, the way llama.cpp does it, so each call here sees plain text
only.

- gpt2: byte-level BPE with the file's merges; the pre-tokenizer is llama.cpp's regex list for
  `tokenizer.ggml.pre`, applied as successive isolating splits, then the GPT-2 byte-to-unicode
  mapping.
- llama: SentencePiece BPE. llama.cpp merges the adjacent pair whose concatenation is the vocabulary
  piece with the highest score (leftmost first on ties). That is a BPE whose merge list is every
  split `left + right = piece` of a vocabulary piece, ranked by the piece's score, which is what we
  derive here (as the HF converters do for SentencePiece BPE models). Characters missing from the
  vocabulary fall back to `<0xNN>` byte tokens. Spaces are turned into U+2581 by the caller.
"""

from __future__ import annotations

import logging

import numpy as np
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from worker_orcd.errors import ModelLoadError
from worker_orcd.tokenizer.metadata import NORMAL, VocabData

logger = logging.getLogger(__name__)

_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_FAMILY = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{DIGITS}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), applied in order.
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (
        r"[\p{P}\$\+<=>\^~\|]+",
        _GPT2_WORDS,
        r"\p{N}+",
        r"[0-9][0-9][0-9]",
    ),
    "gpt-2": (_GPT2_WORDS,),
    "llama-bpe": (_LLAMA3_FAMILY.replace("{DIGITS}", "{1,3}"),),
    "qwen2": (_LLAMA3_FAMILY.replace("{DIGITS}", ""),),
}
# Pre-tokenizers for which llama.cpp keeps a pre-token that is a vocabulary entry whole.
_IGNORE_MERGES = frozenset({"llama-bpe"})

SPM_SPACE = "\u2581"


def build_gpt2(vocab: VocabData) -> HFTokenizer:
    pre = vocab.pre or "default"
    if vocab.pre is None:
        logger.warning("tokenizer.ggml.pre is missing; using llama.cpp's default BPE pre-tokenizer")
    if pre not in PRE_TOKENIZER_REGEXES:
        raise ModelLoadError(
            f"tokenizer.ggml.pre {pre!r} is not supported; supported: "
            + ", ".join(sorted(PRE_TOKENIZER_REGEXES))
        )
    assert vocab.merges is not None
    merges = []
    for i, m in enumerate(vocab.merges):
        left, sep, right = m.partition(" ")
        if not sep:
            raise ModelLoadError(f"tokenizer.ggml.merges[{i}] = {m!r} is not 'left right'")
        merges.append((left, right))
    model = models.BPE(
        vocab=dict(zip(vocab.tokens, range(len(vocab.tokens)), strict=True)),
        merges=merges,
        ignore_merges=pre in _IGNORE_MERGES,
    )
    tok = HFTokenizer(model)
    splits = [
        pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZER_REGEXES[pre]
    ]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return tok


def build_spm(vocab: VocabData) -> HFTokenizer:
    assert vocab.scores is not None
    tokens, scores, types = vocab.tokens, vocab.scores, vocab.types
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    merges: list[tuple[float, int, int, str, str]] = []
    for piece, pid in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-float(scores[pid]), pid, cut, left, right))
    merges.sort()
    unk = tokens[vocab.unk_id] if vocab.unk_id is not None else None
    ids = dict(zip(tokens, range(len(tokens)), strict=True))
    missing = sum(f"<0x{b:02X}>" not in ids for b in range(256))
    if missing:
        logger.warning("SentencePiece vocabulary lacks %d of the 256 byte tokens <0xNN>", missing)
    model = models.BPE(
        vocab=ids,
        merges=[(m[3], m[4]) for m in merges],
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    logger.debug(
        "SentencePiece BPE: %d merges derived from %d scored pieces",
        len(merges),
        int(np.count_nonzero(types == NORMAL)),
    )
    return HFTokenizer(model)
