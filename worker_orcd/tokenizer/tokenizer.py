"""Tokenizer built from GGUF metadata: encode, decode, special tokens, end-of-generation ids.

Encoding follows llama.cpp (`llama_vocab::tokenize`):
1. the text is partitioned on special-token text (tokens with the CONTROL, USER_DEFINED or UNKNOWN
   attribute, below), longest token first. USER_DEFINED tokens are always split off, unless they
   are CONTROL too; CONTROL and UNKNOWN tokens only with `parse_special=True` (otherwise their
   text is ordinary text). Tokens with the RSTRIP attribute swallow the whitespace after them;
2. each text fragment is tokenized on its own (byte-level BPE, or SentencePiece with a dummy-prefix
   space at the start of the text and after every special token);
3. BOS/EOS are added when `add_special` and the metadata ask for them.

Decoding is the inverse: SentencePiece drops the one dummy-prefix space of the first text token at
the start and after each special token, so `decode(encode(s, add_special=False)) == s`.

Token attributes and end of generation (EOG), as llama.cpp's vocab loader derives them
(`llama_vocab::impl::load`; implemented in `attributes.derive`), in this order:
0. `tokenizer.ggml.token_type` gives each token one attribute: NORMAL, UNKNOWN, CONTROL,
   USER_DEFINED, UNUSED or BYTE (NORMAL for all when the key is absent).
1. EOT, EOM and fill-in-the-middle tokens (FIM prefix, suffix, middle, pad, repo, file separator)
   that the metadata (`tokenizer.ggml.eot_token_id`, `eom_token_id`, `fim_*_token_id` and the older
   `prefix/suffix/middle_token_id`) does not name are found by their text (`attributes.BY_TEXT`:
   `<|im_end|>`, `<|endoftext|>`, `<|fim_prefix|>`, `<|fim_pad|>`, `<|repo_name|>`,
   `<|file_sep|>`, ...) and become CONTROL. llama.cpp takes the first hit in its hash map's order;
   we take the lowest id.
2. CONTROL tokens whose text contains "unused" become UNUSED too.
3. EOG = the FIM pad, repo and file-separator tokens, plus every token whose text is in
   `attributes.EOG_TEXTS` (`<|eot_id|>`, `<|im_end|>`, `<|end|>`, `<|endoftext|>`, `</s>`,
   `<|eom_id|>`, `<end_of_turn>`, `<|end_of_text|>`, `<EOT>`, `<|return|>`, `<|call|>`, ...);
   these become CONTROL, whatever their type in the file.
4. `<|channel|>`, `<|message|>`, `<|start|>`, `<|constrain|>` become exactly USER_DEFINED.
5. EOS, EOT and EOM join the EOG set.
6. If the EOG set holds `<|end|>` with `<|call|>`/`<|calls|>` and `<|return|>`/`<|flush|>`,
   `<|end|>` leaves it and becomes USER_DEFINED.
7. If it holds `</s>` with `<|tool_response>` or `<|plamo:eos|>`, `</s>` leaves it and becomes
   NORMAL.
8. Phi-3 (general.name contains "phi-3" or "phi3", any case): every CONTROL, USER_DEFINED or
   UNKNOWN token and `</s>` get RSTRIP, except `<unk>`, `<s>` and `<|endoftext|>`.
So Qwen2.5-Coder's `</s>` (id 128247, NORMAL in the file) is one token when special tokens are
parsed, plain text otherwise, and ends generation; Phi-3's `</s>` (id 2, USER_DEFINED in the file)
is CONTROL as well, so unparsed it is the text `</`, `s`, `>`. Unlike llama.cpp we give a gpt2
vocabulary without `tokenizer.ggml.eos_token_id` no EOS (llama.cpp assumes id 11), and we reject
special-token ids outside the vocabulary instead of falling back to a default.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from typing import Any

import jinja2
import numpy as np

from worker_orcd.errors import ChatTemplateError
from worker_orcd.tokenizer.attributes import SPECIAL, Attr, derive
from worker_orcd.tokenizer.chat import ChatTemplate
from worker_orcd.tokenizer.decoder import IncrementalDecoder
from worker_orcd.tokenizer.metadata import VocabData, load_metadata
from worker_orcd.tokenizer.models import SPM_SPACE, build_gpt2, build_spm

logger = logging.getLogger(__name__)

_C_SPACE = " \t\n\v\f\r"  # C isspace(), which llama.cpp uses for rstrip


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
        self._ids: dict[str, int] = dict(zip(vocab.tokens, range(len(vocab.tokens)), strict=True))
        self._hf = build_gpt2(vocab) if vocab.model == "gpt2" else build_spm(vocab)
        self._spm = vocab.model == "llama"
        self._space_prefix = self._spm and vocab.add_space_prefix

        derived = derive(vocab, self._ids)
        attrs = self._attrs = derived.attrs
        self._eog = derived.eog_ids
        self._partition_ids = frozenset(int(i) for i in np.flatnonzero(attrs & SPECIAL))
        order = sorted(
            (i for i in self._partition_ids if vocab.tokens[i]),
            key=lambda i: (-len(vocab.tokens[i]), i),
        )
        self._special_order = tuple(order)
        skip = Attr.CONTROL | Attr.UNKNOWN | Attr.UNUSED
        self._skippable = frozenset(int(i) for i in np.flatnonzero(attrs & skip))
        self._unused = tuple(int(i) for i in np.flatnonzero(attrs & (Attr.UNUSED | Attr.UNKNOWN)))
        self._pieces: list[bytes | None] = [None] * len(vocab.tokens)
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
        """Generation stops on any of these: EOS, EOT, EOM, end-of-turn and FIM pad/repo/file
        separator tokens (the module docstring gives llama.cpp's rules)."""
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

    def token_attr(self, token_id: int) -> Attr:
        """The token's attributes as llama.cpp derives them (see the module docstring)."""
        self._check_id(token_id)
        return Attr(int(self._attrs[token_id]))

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
        unparsed = Attr.CONTROL | Attr.UNKNOWN
        for tid in self._special_order:
            if not parse_special and self._attrs[tid] & unparsed:
                continue
            needle = tokens[tid]
            if not any(isinstance(f, str) and needle in f for f in frags):
                continue
            rstrip = bool(self._attrs[tid] & Attr.RSTRIP)
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

    def token_bytes(self, token_id: int) -> bytes:
        """One token's bytes as it reads inside a text (a special token as its text): what
        OpenAI's logprobs give as a token's bytes. Part of a UTF-8 character, for some tokens."""
        return self._piece(int(token_id), skip_special=False, at_start=False)[0]

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
        attr = self._attrs[token_id]
        if token_id in self._partition_ids or attr & Attr.UNUSED:
            if skip_special and token_id in self._skippable:
                return b"", True
            return self._v.tokens[token_id].encode(), True
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._piece_bytes(token_id)
        if at_start and self._space_prefix and piece[:1] == b" " and attr & Attr.NORMAL:
            piece = piece[1:]
        return piece, False

    def _piece_bytes(self, token_id: int) -> bytes:
        text = self._v.tokens[token_id]
        if self._attrs[token_id] & Attr.BYTE:
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
