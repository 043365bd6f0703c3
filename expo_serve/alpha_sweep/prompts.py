"""The prompt file: JSONL, one prompt a line, as `{"prompt": str}` or `{"messages": [...]}`, with an optional `id`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ExpoError


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple[dict, ...]  # a `prompt` line is one user message

    @property
    def question(self) -> str:
        """The last user message: what a judge is shown as the question."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else self.messages[-1]["content"]


def _messages(value, where: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise ExpoError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects.")
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ExpoError(f"{where}: every message needs a string `role` and a string `content`.")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def load_prompts(path: str | Path) -> list[Prompt]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ExpoError(f"Cannot read the prompt file {path}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError:
        raise ExpoError(f"The prompt file {path} is not UTF-8 text.") from None
    prompts, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExpoError(f"{where} is not valid JSON ({exc.msg}).") from None
        if not isinstance(row, dict):
            raise ExpoError(f"{where}: each line must be a JSON object with `prompt` or `messages`.")
        if ("prompt" in row) == ("messages" in row):
            raise ExpoError(f"{where}: each line needs exactly one of `prompt` and `messages`.")
        if "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise ExpoError(f"{where}: `prompt` must be a non-empty string.")
            messages = ({"role": "user", "content": row["prompt"]},)
        else:
            messages = _messages(row["messages"], where)
        pid = row.get("id", number)
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise ExpoError(f"{where}: `id` must be a string or an integer.")
        pid = str(pid)
        if pid in seen:
            raise ExpoError(f"{where}: the id {pid!r} is used twice.")
        seen.add(pid)
        prompts.append(Prompt(pid, messages))
    if not prompts:
        raise ExpoError(f"The prompt file {path} holds no prompts.")
    return prompts
