"""The two examples the server prints when it is ready: curl, and the openai client.

Both run as printed in a POSIX shell; with an API key they read it from EXPO_SERVE_API_KEY
(printing the key itself would leave it in the terminal's scroll-back).
"""
from __future__ import annotations

import importlib.util
import json
import sys

KEY_ENV = "EXPO_SERVE_API_KEY"
QUESTION = "Give me three tips for sleeping well."


def curl_example(base_url: str, model: str, alpha: float, with_key: bool) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "alpha": alpha, "max_tokens": 64}
    auth = f' \\\n  -H "Authorization: Bearer ${KEY_ENV}"' if with_key else ""
    return (f"curl -s {base_url}/v1/chat/completions \\\n  -H 'Content-Type: application/json'{auth} \\\n"
            f"  -d '{json.dumps(body)}'")


def python_with_openai() -> str:
    """This interpreter when it has the openai package (as `make demo`'s venv does), so the
    example runs as printed from any shell; else plain python3."""
    return sys.executable if importlib.util.find_spec("openai") is not None else "python3"


def openai_example(base_url: str, model: str, alpha: float, with_key: bool, python: str = "python3") -> str:
    key = f'os.environ["{KEY_ENV}"]' if with_key else '"unused"'
    return f"""{python} - <<'PY'
import os
from openai import OpenAI

client = OpenAI(base_url="{base_url}/v1", api_key={key})
reply = client.chat.completions.create(
    model="{model}",
    messages=[{{"role": "user", "content": "{QUESTION}"}}],
    max_tokens=64,
    extra_body={{"alpha": {alpha!r}}},  # ExPO strength for this request
)
print(reply.choices[0].message.content)
print(reply.model_extra["expo"])  # which alpha (and A/B arm) served it
PY"""


def banner(base_url: str, model: str, alpha: float, with_key: bool) -> str:
    return "\n".join([
        f"expo-serve: serving {model} at {base_url} (OpenAI-compatible; pass alpha per request)",
        "",
        "Try it with curl:",
        "",
        curl_example(base_url, model, alpha, with_key),
        "",
        "or with the openai client (pip install openai):",
        "",
        openai_example(base_url, model, alpha, with_key, python_with_openai()),
        "",
    ])
