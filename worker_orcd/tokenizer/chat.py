"""Chat templates: `tokenizer.chat_template` rendered with jinja2 the way transformers does it.

Sandboxed (`ImmutableSandboxedEnvironment`), `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `{% generation %}` block that just renders its body, `tojson` without ASCII escaping,
and the globals `raise_exception` and `strftime_now`. The template sees `messages`,
`add_generation_prompt`, `bos_token`, `eos_token` (and `unk_token`) plus any extra keyword, e.g.
`tools`.

A rendered prompt holds special tokens as text (`<|im_start|>`, and `<s>` when the template renders
`{{ bos_token }}` as Phi-3's does): encode it with `Tokenizer.encode_chat`, or equivalently with
`encode(text, add_special=True, parse_special=True)` dropping a doubled leading BOS.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from os import PathLike
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from worker_orcd.errors import ChatTemplateError, ModelLoadError
from worker_orcd.tokenizer.metadata import load_metadata

logger = logging.getLogger(__name__)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template rejected the messages: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(
        self, source: str, *, bos_token: str = "", eos_token: str = "", unk_token: str | None = None
    ) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self._template = env.from_string(source)
        self._tokens: dict[str, str] = {"bos_token": bos_token, "eos_token": eos_token}
        if unk_token is not None:
            self._tokens["unk_token"] = unk_token

    @classmethod
    def from_gguf(cls, source: str | PathLike[str] | Mapping[str, Any]) -> ChatTemplate | None:
        """The template of a GGUF file or metadata mapping; None when it has none."""
        md = load_metadata(source)
        text = md.get("tokenizer.chat_template")
        if not text:
            return None
        tokens = md.get("tokenizer.ggml.tokens") or []
        special: dict[str, str] = {}
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
        ):
            tid = md.get(f"tokenizer.ggml.{key}")
            if tid is not None and 0 <= int(tid) < len(tokens):
                special[name] = tokens[int(tid)]
        try:
            return cls(text, **special)
        except jinja2.TemplateError as e:
            raise ModelLoadError(f"tokenizer.chat_template cannot be compiled: {e}") from e

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        _check_messages(messages)
        context = {**self._tokens, "tools": None, **kwargs}
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from e


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string 'role'")
