"""Chat messages -> prompt token ids, through the tokenizer's own chat template."""
from __future__ import annotations

from ..api_common import quote
from .errors import invalid
from .protocol import ChatMessage


def plain_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the template expects them: string content (text parts joined), and the
    newer `developer` role as `system`, which templates know. (Parts are text: protocol.ContentPart.)"""
    plain = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
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
        # The template's words may hold the messages' text: quoted.
        raise invalid(f"The chat template cannot format these messages: {quote(str(exc), 200)}", param="messages",
                      code="chat_template_error") from None
    return list(tokenizer.encode(text, add_special_tokens=False))
