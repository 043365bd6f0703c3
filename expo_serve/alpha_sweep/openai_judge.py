"""An LLM judge on any OpenAI-compatible endpoint (expo-serve included), pairwise against α = 0.

Each answer is shown with the α = 0 answer to the same prompt twice, once in each order, and the
verdicts are averaged, so a judge that favours a position whatever it reads scores a tie. The
judging prompt is judge_prompt.txt, shipped with the package. HTTP goes through the standard
library: the `openai` client is not a runtime dependency.
"""
from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from string import Template

from ..errors import ExpoError
from .generate import Sample
from .judges import Judge

PROMPT = Template((Path(__file__).with_name("judge_prompt.txt")).read_text(encoding="utf-8"))
VERDICT = re.compile(r"\b(first|second)\b", re.IGNORECASE)
WORKERS = 8  # requests in flight: enough for a server to batch them
MAX_TOKENS = 16
TIMEOUT_S = 300


def verdict_for_first(reply: str) -> float:
    """1 if the reply prefers the first answer, 0 the second, 0.5 if it names neither."""
    found = VERDICT.search(reply)
    if found is None:
        return 0.5
    return 1.0 if found.group(1).lower() == "first" else 0.0


class OpenAIJudge(Judge):
    name = "openai"
    pairwise = True

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

    def describe(self) -> str:
        return f"openai ({self.base_url}, model {self.model or '?'}, pairwise against α = 0, both orders)"

    def _http(self, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace").strip()
            raise ExpoError(f"The judge at {self.base_url} answered HTTP {exc.code} to {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ExpoError(f"Cannot reach the judge at {self.base_url}: {getattr(exc, 'reason', exc)}.") from None
        except ValueError:
            raise ExpoError(f"The judge at {self.base_url} did not answer {path} with JSON.") from None

    def _resolve_model(self) -> str:
        if self.model is None:
            models = self._http("/models").get("data") or []
            if not models:
                raise ExpoError(f"The judge at {self.base_url} lists no models; name one as openai:URL#MODEL.")
            self.model = models[0]["id"]
        return self.model

    def ask(self, question: str, first: str, second: str) -> str:
        reply = self._http("/chat/completions", {
            "model": self.model, "temperature": 0.0, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": PROMPT.substitute(question=question, first=first, second=second)}],
        })
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ExpoError(f"The judge at {self.base_url} sent a chat completion without a message.") from None

    def score(self, samples: list[Sample], prompts, llm) -> None:
        from tqdm import tqdm

        self._resolve_model()
        controls = {(s.prompt_index, s.sample): s for s in samples if s.alpha == 0.0}
        jobs = []  # (sample, question, first, second, whether the sample is shown first)
        for s in samples:
            control = controls[(s.prompt_index, s.sample)]
            if s.alpha == 0.0 or s.token_ids == control.token_ids:
                s.score, s.verdicts = 0.5, []  # the same answer: a tie without asking
                continue
            question = prompts[s.prompt_index].question
            jobs.append((s, question, s.text, control.text, True))
            jobs.append((s, question, control.text, s.text, False))
        with ThreadPoolExecutor(WORKERS) as pool, tqdm(total=len(jobs), desc="judging (pairwise, both orders)",
                                                        unit="verdict", file=sys.stderr, dynamic_ncols=True) as bar:
            def run(job):
                reply = self.ask(job[1], job[2], job[3])
                bar.update(1)
                return reply

            replies = list(pool.map(run, jobs))
        wins: dict[int, list[float]] = {}
        for (s, _, _, _, sample_first), reply in zip(jobs, replies):
            first = verdict_for_first(reply)
            wins.setdefault(id(s), []).append(first if sample_first else 1.0 - first)
            s.verdicts = (s.verdicts or []) + [reply]
        for s in samples:
            if id(s) in wins:
                s.score = sum(wins[id(s)]) / len(wins[id(s)])
