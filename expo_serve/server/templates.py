"""Chat messages -> prompt token ids, through the tokenizer's own chat template."""
from __future__ import annotations

from .errors import invalid
from .protocol import ChatMessage


def plain_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the template expects them: string content (text parts joined), and the
    newer `developer` role as `system`, which templates know."""
    plain = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise invalid(f"Only text content is supported, got a '{part.type}' part.",
                                  param=f"messages[{i}].content[{j}]", code="unsupported_content")
                texts.append(part.text)
            content = "\n".join(texts)
        item = {"role": "system" if message.role == "developer" else message.role, "content": content or ""}
        if message.name is not None:
            item["name"] = message.name
        plain.append(item)
    return plain


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    """The prompt's token ids; a template that cannot render these messages is a 400."""
    plain = plain_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise invalid("This model has no chat template; use /v1/completions.", param="messages",
                      code="no_chat_template")
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - templates raise what they like (jinja2, ValueError, TypeError …)
        raise invalid(f"The chat template cannot format these messages: {exc}", param="messages",
                      code="chat_template_error") from None
    return list(tokenizer.encode(text, add_special_tokens=False))
