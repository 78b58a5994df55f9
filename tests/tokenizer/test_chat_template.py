"""Chat templates from GGUF metadata, rendered as transformers renders them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.vocab import vocab_path
from worker_orcd.errors import ChatTemplateError
from worker_orcd.tokenizer import ChatTemplate, Tokenizer

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello!"},
]


def test_qwen_chatml(qwen_model_tok: Tokenizer) -> None:
    assert qwen_model_tok.apply_chat_template(MESSAGES) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = qwen_model_tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert no_prompt.endswith("<|im_start|>user\nHello!<|im_end|>\n")
    # without a system message the template supplies Qwen's default one
    default = qwen_model_tok.apply_chat_template(MESSAGES[1:])
    assert default.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_qwen_chat_encoding(qwen_model_tok: Tokenizer) -> None:
    ids = qwen_model_tok.encode_chat(MESSAGES)
    rendered = qwen_model_tok.apply_chat_template(MESSAGES)
    assert ids == qwen_model_tok.encode(rendered, add_special=False, parse_special=True)
    assert ids[0] == 151644 and ids[-3:] == [151644, 77091, 198]  # <|im_start|> assistant \n
    assert ids.count(151645) == 2


def test_phi3_template(phi3_tok: Tokenizer) -> None:
    user = [{"role": "user", "content": "Hello!"}]
    rendered = phi3_tok.apply_chat_template(user)
    assert rendered == "<s><|user|>\nHello!<|end|>\n<|assistant|>\n"
    # the template renders BOS as text: encoded with parse_special it is the BOS id, once
    ids = phi3_tok.encode_chat(user)
    assert ids[:2] == [1, 32010] and ids.count(1) == 1 and ids[-1] == 32001
    naive = phi3_tok.encode(rendered, add_special=True, parse_special=True)
    assert naive[:2] == [1, 1]  # what encode_chat avoids
    assert ids == phi3_tok.encode(rendered, add_special=False, parse_special=True)


def test_template_from_path_and_mapping(phi3_tok: Tokenizer) -> None:
    from_path = ChatTemplate.from_gguf(vocab_path("phi-3"))
    assert from_path is not None and phi3_tok.chat_template is not None
    assert from_path.source == phi3_tok.chat_template.source
    md = {"tokenizer.chat_template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}",
          "tokenizer.ggml.tokens": ["<s>", "</s>"], "tokenizer.ggml.bos_token_id": 0,
          "tokenizer.ggml.eos_token_id": 1}  # fmt: skip
    tmpl = ChatTemplate.from_gguf(md)
    assert tmpl is not None and tmpl.render([{"role": "user", "content": "x"}]) == "<s>x</s>"


def test_model_without_template(llama_spm_tok: Tokenizer) -> None:
    assert llama_spm_tok.chat_template is None
    assert ChatTemplate.from_gguf(vocab_path("llama-spm")) is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        llama_spm_tok.apply_chat_template(MESSAGES)
    with pytest.raises(ChatTemplateError):
        llama_spm_tok.encode_chat(MESSAGES)


def test_template_helpers_and_errors() -> None:
    src = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('first must be user') }}{% endif %}"
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
    )
    tmpl = ChatTemplate(src)
    msgs = [{"role": "user", "content": "平方"}, {"role": "user", "content": "b"}]
    expected_json = '[{"role": "user", "content": "平方"}, {"role": "user", "content": "b"}]'
    assert tmpl.render(msgs) == expected_json + "|4[平方]"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        tmpl.render([{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="messages"):
        tmpl.render("hello")  # type: ignore[arg-type]
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]"):
        tmpl.render([{"content": "x"}])


def test_sandbox_blocks_attribute_escape() -> None:
    tmpl = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        tmpl.render([{"role": "user", "content": "x"}])


def test_broken_template_only_disables_chat(tmp_path: Path) -> None:
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.chat_template": "{% for m in messages %}",
    }
    tok = Tokenizer.from_gguf(md)
    assert tok.encode("ab") == [2]
    with pytest.raises(ChatTemplateError, match="unusable"):
        tok.apply_chat_template(MESSAGES)
