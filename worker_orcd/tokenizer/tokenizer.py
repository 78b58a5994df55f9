"""Tokenizer built from GGUF metadata: encode, decode, special tokens, end-of-generation ids.

Encoding follows llama.cpp (`llama_vocab::tokenize`):
1. the text is partitioned on special-token text, longest token first. USER_DEFINED tokens are
   always split off; CONTROL and UNKNOWN tokens only with `parse_special=True` (otherwise their text
   is ordinary text). Tokens with the rstrip/lstrip attribute swallow the whitespace beside them
   (Phi-3 sets it);
2. each text fragment is tokenized on its own (byte-level BPE, or SentencePiece with a dummy-prefix
   space at the start of the text and after every special token);
3. BOS/EOS are added when `add_special` and the metadata ask for them.

Decoding is the inverse: SentencePiece drops the one dummy-prefix space of the first text token at
the start and after each special token, so `decode(encode(s, add_special=False)) == s`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from typing import Any

import jinja2
import numpy as np

from worker_orcd.errors import ChatTemplateError
from worker_orcd.tokenizer.chat import ChatTemplate
from worker_orcd.tokenizer.decoder import IncrementalDecoder
from worker_orcd.tokenizer.metadata import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    VocabData,
    load_metadata,
)
from worker_orcd.tokenizer.models import SPM_SPACE, build_gpt2, build_spm

logger = logging.getLogger(__name__)

# Token texts that end a turn or the text (llama.cpp's end-of-generation list), matched exactly.
EOG_TOKEN_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<end_of_turn>",
        "<EOT>",
        "_<EOT>",
        "<end_of_utterance>",
        "<|return|>",
        "<|call|>",
    }
)
_C_SPACE = " \t\n\v\f\r"  # C isspace(), which llama.cpp uses for lstrip/rstrip


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _gpt2_byte_decoder()
_BYTE_TRANSLATE = str.maketrans({c: chr(b) for c, b in _BYTE_DECODER.items()})


class Tokenizer:
    """A GGUF tokenizer (`kind` "gpt2": byte-level BPE; "llama": SentencePiece BPE with scores)."""

    def __init__(self, vocab: VocabData) -> None:
        self._v = vocab
        self._types = vocab.types
        self._ids: dict[str, int] = dict(zip(vocab.tokens, range(len(vocab.tokens)), strict=True))
        self._hf = build_gpt2(vocab) if vocab.model == "gpt2" else build_spm(vocab)
        self._spm = vocab.model == "llama"
        self._space_prefix = self._spm and vocab.add_space_prefix

        types = vocab.types
        partition_mask = (types == CONTROL) | (types == USER_DEFINED) | (types == UNKNOWN)
        self._partition_ids = frozenset(int(i) for i in np.flatnonzero(partition_mask))
        order = sorted(
            (i for i in self._partition_ids if vocab.tokens[i]),
            key=lambda i: (-len(vocab.tokens[i]), i),
        )
        self._special_order = tuple(order)
        self._skippable = frozenset(
            int(i)
            for i in np.flatnonzero((types == CONTROL) | (types == UNKNOWN) | (types == UNUSED))
        )
        self._lstrip: frozenset[int] = frozenset()
        self._rstrip: frozenset[int] = frozenset()
        if vocab.architecture == "phi3":
            # Phi-3's special tokens strip the whitespace after them, as in its HF tokenizer.json
            # and llama.cpp; <unk>, <s> and <|endoftext|> do not.
            keep = {self._ids.get(t) for t in ("<unk>", "<s>", "<|endoftext|>")}
            self._rstrip = frozenset(i for i in self._partition_ids if i not in keep)

        self._pieces: list[bytes | None] = [None] * len(vocab.tokens)
        eog = {i for t, i in self._ids.items() if t in EOG_TOKEN_TEXTS}
        eog.update(i for i in (vocab.eos_id, vocab.eot_id, vocab.eom_id) if i is not None)
        self._eog = frozenset(eog)
        self._unused = tuple(int(i) for i in np.flatnonzero((types == UNUSED) | (types == UNKNOWN)))
        self._chat_template: ChatTemplate | None = None
        self._chat_template_error: str | None = None
        if vocab.chat_template:
            try:
                self._chat_template = ChatTemplate(vocab.chat_template, **self._template_tokens())
            except jinja2.TemplateError as e:  # a bad template disables chat mode, not the model
                self._chat_template_error = f"{type(e).__name__}: {e}"
                logger.warning("tokenizer.chat_template cannot be compiled: %s", e)

    @classmethod
    def from_gguf(cls, source: str | PathLike[str] | Mapping[str, Any]) -> Tokenizer:
        """From a GGUF path or its parsed metadata (`tokenizer.ggml.tokens` -> list[str], ...)."""
        return cls(VocabData.from_metadata(load_metadata(source)))

    # -- properties ------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self._v.model

    @property
    def pre(self) -> str | None:
        return self._v.pre

    @property
    def vocab_size(self) -> int:
        return len(self._v.tokens)

    @property
    def bos_id(self) -> int | None:
        return self._v.bos_id

    @property
    def eos_id(self) -> int | None:
        return self._v.eos_id

    @property
    def add_bos(self) -> bool:
        return self._v.add_bos

    @property
    def add_eos(self) -> bool:
        return self._v.add_eos

    @property
    def eog_ids(self) -> frozenset[int]:
        """EOS plus end-of-turn tokens: generation stops on any of them."""
        return self._eog

    @property
    def unused_ids(self) -> tuple[int, ...]:
        """Ids never to sample: token type UNUSED or UNKNOWN (padding such as Phi-3's [PAD32011]).

        Logits beyond `vocab_size` (a model whose output layer is wider than its vocabulary) must be
        masked by the caller as well.
        """
        return self._unused

    @property
    def special_ids(self) -> frozenset[int]:
        """CONTROL, UNKNOWN and UNUSED ids: dropped by `decode(..., skip_special=True)`."""
        return self._skippable

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry as stored (e.g. 'Ġworld' or '▁world')."""
        self._check_id(token_id)
        return self._v.tokens[token_id]

    def token_to_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    # -- encode ----------------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        out: list[int] = []
        if add_special and self._v.add_bos:
            if self._v.bos_id is None:
                raise ValueError("tokenizer.ggml.add_bos_token is set but the model has no BOS id")
            out.append(self._v.bos_id)
        prev_special = True
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if self._spm:
                if self._space_prefix and prev_special:
                    frag = " " + frag
                frag = frag.replace(" ", SPM_SPACE)
            out.extend(self._hf.encode(frag, add_special_tokens=False).ids)
            prev_special = False
        if add_special and self._v.add_eos:
            if self._v.eos_id is None:
                raise ValueError("tokenizer.ggml.add_eos_token is set but the model has no EOS id")
            out.append(self._v.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        frags: list[str | int] = [text] if text else []
        tokens = self._v.tokens
        for tid in self._special_order:
            if not parse_special and self._types[tid] != USER_DEFINED:
                continue
            needle = tokens[tid]
            if not any(isinstance(f, str) and needle in f for f in frags):
                continue
            rstrip, lstrip = tid in self._rstrip, tid in self._lstrip
            new: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or needle not in frag:
                    new.append(frag)
                    continue
                parts = frag.split(needle)
                for k, part in enumerate(parts):
                    if k > 0:
                        new.append(tid)
                        if rstrip:
                            part = part.lstrip(_C_SPACE)
                    if lstrip and k < len(parts) - 1:
                        part = part.rstrip(_C_SPACE)
                    if part:
                        new.append(part)
            frags = new
        return frags

    # -- decode ----------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        chunks: list[bytes] = []
        at_start = True
        for token_id in ids:
            piece, at_start = self._piece(int(token_id), skip_special, at_start)
            chunks.append(piece)
        return b"".join(chunks).decode("utf-8", "replace")

    def decoder(self, skip_special: bool = True, prev_id: int | None = None) -> IncrementalDecoder:
        """A streaming decoder; it skips special tokens by default (it streams generated text).

        `prev_id` is the token before the first one pushed (the prompt's last). Without it the
        stream is taken to start a text, so a SentencePiece first token loses its dummy-prefix
        space, exactly as in `decode`. Pass the prompt's last id when continuing plain text
        (completion mode).
        """
        at_start = True
        if prev_id is not None:
            self._check_id(prev_id)
            at_start = prev_id in self._partition_ids
        return IncrementalDecoder(self, skip_special, at_start)

    def _piece(self, token_id: int, skip_special: bool, at_start: bool) -> tuple[bytes, bool]:
        """Bytes of one token and whether the next token starts a text (SentencePiece spaces)."""
        self._check_id(token_id)
        if token_id in self._partition_ids or self._types[token_id] == UNUSED:
            if skip_special and token_id in self._skippable:
                return b"", True
            return self._v.tokens[token_id].encode(), True
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._piece_bytes(token_id)
        if (
            at_start
            and self._space_prefix
            and piece[:1] == b" "
            and self._types[token_id] == NORMAL
        ):
            piece = piece[1:]
        return piece, False

    def _piece_bytes(self, token_id: int) -> bytes:
        text = self._v.tokens[token_id]
        if self._types[token_id] == BYTE:
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                return bytes([int(text[3:5], 16)])
            return text.encode()  # gpt2 vocabularies may mark plain byte chars as BYTE
        if self._spm:
            return text.replace(SPM_SPACE, " ").encode()
        try:
            return text.translate(_BYTE_TRANSLATE).encode("latin-1")
        except UnicodeEncodeError:
            return text.encode()

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < len(self._v.tokens):
            raise ValueError(
                f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})"
            )

    # -- chat ------------------------------------------------------------------------------------
    def _template_tokens(self) -> dict[str, str]:
        names = {
            "bos_token": self._v.bos_id,
            "eos_token": self._v.eos_id,
            "unk_token": self._v.unk_id,
        }
        return {k: self._v.tokens[i] for k, i in names.items() if i is not None}

    @property
    def chat_template(self) -> ChatTemplate | None:
        return self._chat_template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        if self._chat_template is None:
            if self._chat_template_error:
                raise ChatTemplateError(
                    f"model's chat template (tokenizer.chat_template) is unusable: "
                    f"{self._chat_template_error}"
                )
            raise ChatTemplateError(
                "model has no chat template (tokenizer.chat_template is missing); "
                "use completion mode with a raw prompt"
            )
        return self._chat_template.render(messages, add_generation_prompt, **kwargs)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Render the chat template and encode it, with exactly one BOS when the model wants one.

        The rendered text holds special tokens as text (`<|im_start|>`, Phi-3's `<s>` from
        `{{ bos_token }}`), so it is encoded with `parse_special=True`; BOS is added only when the
        template did not already render it.
        """
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        ids = self.encode(text, add_special=True, parse_special=True)
        bos = self._v.bos_id
        if self._v.add_bos and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            del ids[0]
        return ids
