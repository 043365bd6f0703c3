"""A local Hugging Face reward model (AutoModelForSequenceClassification), batched, on the sweep's device."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import ExpoError
from .generate import Sample
from .judges import Judge

BATCH = 16


class RewardModelJudge(Judge):
    name = "reward-model"

    def __init__(self, path: Path, device: str = "cpu", batch_size: int = BATCH):
        self.path, self.device, self.batch_size = Path(path), device, batch_size

    def describe(self) -> str:
        return f"reward-model ({self.path})"

    def score(self, samples: list[Sample], prompts, llm) -> None:
        import torch
        from tqdm import tqdm
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path)
        if not tokenizer.chat_template:
            raise ExpoError(f"The reward model {self.path} has no chat template, so a conversation cannot be formatted for it.")
        model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32).to(self.device).eval()
        if model.config.num_labels != 1:
            raise ExpoError(f"The reward model {self.path} has {model.config.num_labels} outputs; a reward model has one.")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Right padding, and the model told which id pads: it then reads the last real token of
        # each row, and positions match the unpadded sequence.
        tokenizer.padding_side = "right"
        model.config.pad_token_id = tokenizer.pad_token_id

        texts = [tokenizer.apply_chat_template(list(prompts[s.prompt_index].messages) + [{"role": "assistant", "content": s.text}],
                                               tokenize=False) for s in samples]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
        scores = [0.0] * len(texts)
        with torch.inference_mode(), tqdm(total=len(texts), desc="scoring (reward model)", unit="answer",
                                          file=sys.stderr, dynamic_ncols=True) as bar:
            for lo in range(0, len(order), self.batch_size):
                chunk = order[lo:lo + self.batch_size]
                batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
                logits = model(**batch.to(self.device)).logits[:, 0].float().tolist()
                for i, value in zip(chunk, logits):
                    scores[i] = value
                bar.update(len(chunk))
        for s, value in zip(samples, scores):
            s.score = value
