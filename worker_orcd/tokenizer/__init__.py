"""GGUF tokenizers (byte-level BPE, SentencePiece), chat templates and the streaming decoder."""

from __future__ import annotations

from worker_orcd.tokenizer.chat import ChatTemplate
from worker_orcd.tokenizer.decoder import IncrementalDecoder
from worker_orcd.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "IncrementalDecoder", "Tokenizer"]
