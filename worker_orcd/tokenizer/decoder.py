"""Incremental detokenizer for streaming generated text.

Token pieces are bytes: a byte-level BPE token or a SentencePiece `<0xNN>` token may carry only part
of a multi-byte UTF-8 character. Bytes go through an incremental UTF-8 decoder that holds back an
incomplete character until the rest arrives, and invalid bytes become U+FFFD exactly as in
`Tokenizer.decode`, so the concatenated output of `push` calls and `flush` equals
`tokenizer.decode(ids)` with the same `skip_special`. The SentencePiece dummy-prefix space is
dropped once, by `Tokenizer._piece`, for the first text token of a text (and after a special token),
never per token.
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker_orcd.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class IncrementalDecoder:
    tokenizer: Tokenizer
    skip_special: bool = True
    at_start: bool = True
    _utf8: codecs.IncrementalDecoder = field(
        init=False, default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )

    def push(self, token_id: int) -> str:
        """Feed one id; return the text that is now complete (possibly "")."""
        piece, self.at_start = self.tokenizer._piece(
            int(token_id), self.skip_special, self.at_start
        )
        return self._utf8.decode(piece) if piece else ""

    def flush(self) -> str:
        """End of stream: bytes of an unfinished character come out as U+FFFD."""
        return self._utf8.decode(b"", final=True)
