"""The synchronous engine: add requests, step, sample, collect outputs. One thread drives it.

Sampling turns a step's logits into tokens: penalties, temperature, top-k/top-p/min-p, seeded
draws, logprobs. Logprobs are those of the model's own distribution (log-softmax of the raw
logits at that α), which is what evaluation harnesses score; penalties and truncation shape only
the choice.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.llama import context_window
from ..model.loader import LoadedModel, load_model
from .model_runner import ModelRunner, auto_kv_cache_bytes, default_alpha_cache_bytes, kv_bytes_per_block
from .request import (AlphaRange, InvalidRequest, RequestMetrics, RequestOutput, SamplingParams, Sequence, TokenLogprob,
                      top_logprobs)
from .scheduler import BlockManager, Scheduler


@dataclass
class EngineConfig:
    sft: str
    delta: str | None = None
    aligned: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    max_num_seqs: int = 64
    # Tokens one step computes at most. Default: 2048 on CUDA; 512 on a CPU, where a step's prefill
    # costs in full and every new request waits for the step in flight: at 512 the first token comes
    # 2.5× sooner at p50 for the same throughput (bench/RESULTS.md, issue 12).
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # default: the model's, at most 4096
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: sized from kv_cache_bytes or free memory
    kv_cache_bytes: int | None = None
    alpha: AlphaRange = field(default_factory=AlphaRange)  # the α served, and the default
    enforce_eager: bool = False  # on CUDA, do not capture decode steps in CUDA graphs
    # Merged weights for the hot α values (engine/model_runner.py, AlphaCache). Default: on a CPU, where the
    # second product costs in full, one α's worth (if at most an eighth of available memory); on CUDA
    # none, since decode there is bound by bytes and a merged copy per α only adds bytes.
    alpha_cache_bytes: int | None = None
    # Ranks the model is split over (engine/tp_workers.py): rank 0 is this process, the others are
    # worker processes it starts. The KV-cache size (kv_cache_bytes, or the automatic one) is per rank.
    tensor_parallel_size: int = 1
    # Let a tokenizer shipped as code (InternLM2's), with no fast tokenizer file beside it, run that code.
    trust_remote_code: bool = False

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError("max_model_len must be positive")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    alpha: float
    seqs: list[Sequence]
    arrival_time: float


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        self.workers = None
        if config.tensor_parallel_size > 1:
            if loaded is not None:
                raise ValueError("a tensor-parallel engine loads its shards itself; pass no loaded model")
            from .tp_workers import Workers

            spec = dict(sft=config.sft, delta=config.delta, aligned=config.aligned, dtype=config.dtype, device=config.device,
                        trust_remote_code=config.trust_remote_code)
            self.workers, loaded = Workers.start(spec, config.tensor_parallel_size)
        self.loaded = loaded or load_model(config.sft, delta=config.delta, aligned=config.aligned, dtype=config.dtype,
                                           device=config.device, max_positions=None,
                                           trust_remote_code=config.trust_remote_code)
        self.tokenizer = self.loaded.tokenizer
        model_len = context_window(self.loaded.config)
        self.max_model_len = min(config.max_model_len or min(model_len, 4096), model_len)
        per_block = kv_bytes_per_block(self.loaded.config, config.block_size, self.loaded.dtype, self.loaded.model.kv_heads)
        auto_bytes = auto_kv_cache_bytes(self.loaded.device)
        if self.workers is not None and self.loaded.device.type == "cpu":
            auto_bytes //= config.tensor_parallel_size  # the ranks share one machine's memory
        num_blocks = config.num_kv_blocks or max(1, (config.kv_cache_bytes or auto_bytes) // per_block)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        step_tokens = config.max_num_batched_tokens or (2048 if self.loaded.device.type == "cuda" else 512)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, step_tokens)
        cache_bytes = config.alpha_cache_bytes if config.alpha_cache_bytes is not None \
            else default_alpha_cache_bytes(self.loaded.device, self.loaded.model.alpha_slot_bytes)
        make_runner = ModelRunner if self.workers is None else self.workers.runner
        self.runner = make_runner(self.loaded, config.block_size, num_blocks, max_num_seqs=config.max_num_seqs,
                                  max_model_len=self.max_model_len, cuda_graphs=not config.enforce_eager,
                                  alpha_cache_bytes=cache_bytes)
        self.requests: dict[str, _Request] = {}
        self.vocab_size = int(self.loaded.config.vocab_size)

    @property
    def failure(self) -> str | None:
        """Why the engine can no longer step (a tensor-parallel rank died), or None."""
        return None if self.workers is None else self.workers.failure

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (a single rank holds nothing to stop)."""
        if self.workers is not None:
            self.workers.close()

    # -- requests ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=False))
        ids = [int(t) for t in prompt]
        self._check_vocabulary(ids, "prompt")
        return None, ids

    def _check_vocabulary(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary (0 to {self.vocab_size - 1})", param)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; raises InvalidRequest for what can never be served."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id} is already in use", "request_id")
        alpha = self.config.alpha.check(params.alpha)
        text, ids = self.encode_prompt(prompt)
        if not ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        room = self.max_model_len - len(ids)
        if room < 0 or (room == 0 and params.max_tokens != 0):
            raise InvalidRequest(f"the prompt has {len(ids)} tokens; this model's context window is {self.max_model_len}",
                                 "prompt", "context_length_exceeded")
        max_tokens = params.max_tokens
        if max_tokens is None:  # as many as fit, within the caller's default (a server's cap)
            cap = params.default_max_tokens
            max_tokens = room if cap is None else min(room, max(cap, params.min_tokens))
        if max_tokens > room:
            raise InvalidRequest(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context window "
                                 f"of {self.max_model_len} tokens", "max_tokens", "context_length_exceeded")
        if params.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens ({params.min_tokens}) is more than the {max_tokens} tokens this request "
                                 "may generate (max_tokens)", "min_tokens")
        self._check_vocabulary(params.stop_token_ids, "stop_token_ids")
        needed = self.block_manager.blocks_for(len(ids) + max_tokens)
        if needed > self.block_manager.num_blocks:
            raise InvalidRequest(f"the request needs {needed} KV-cache blocks; the cache has {self.block_manager.num_blocks}",
                                 "max_tokens", "context_length_exceeded")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.loaded.eos_token_ids)
        seqs = []
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            seqs.append(Sequence(request_id, index, ids, params, alpha, max_tokens, stop_ids, self.tokenizer, seed))
        self.requests[request_id] = _Request(request_id, text, ids, alpha, seqs, time.monotonic())
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                seq.finish("abort")
                self.scheduler.finish(seq)
        return self._output(self.requests.pop(request_id))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.block_manager.usage,
                           self.scheduler.num_preemptions)

    # -- stepping ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return the current output of every request that progressed."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        step = self.runner.execute(batch)
        for item in batch:
            item.seq.num_computed_tokens += item.num_new_tokens
        touched = {item.seq.request_id for item in batch}
        if step.sampled:
            seqs = [item.seq for item in step.sampled]
            live = [i for i, s in enumerate(seqs) if s.max_tokens > 0]
            for s in seqs:
                if s.max_tokens == 0:  # prompt scoring only (echo with logprobs)
                    s.finish("length")
            if live:
                tokens, logprobs = sample(step.logits[live] if len(live) < len(seqs) else step.logits, [seqs[i] for i in live])
                for i, token, lp in zip(live, tokens, logprobs):
                    seqs[i].append(token, lp)
                    if seqs[i].num_tokens >= self.max_model_len and not seqs[i].finished:
                        seqs[i].finish("length")
            for s in seqs:
                if s.finished:
                    self.scheduler.finish(s)
        outputs = []
        for request_id in touched:
            request = self.requests[request_id]
            output = self._output(request)
            if output.finished:
                del self.requests[request_id]
            outputs.append(output)
        return outputs

    def _output(self, request: _Request) -> RequestOutput:
        seqs = request.seqs
        first = [s.first_token_time for s in seqs if s.first_token_time is not None]
        finished = all(s.finished for s in seqs)
        metrics = RequestMetrics(request.arrival_time, min(first) if first else None, time.monotonic() if finished else None)
        prompt_lps = seqs[0].prompt_logprobs
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            alpha=request.alpha,
            outputs=[s.snapshot() for s in seqs],
            prompt_logprobs=list(prompt_lps) if prompt_lps is not None else None,
            metrics=metrics,
            finished=finished,
        )

    @torch.inference_mode()
    def run_to_completion(self, request_ids: list[str],
                          on_finished: Callable[[RequestOutput], None] | None = None) -> dict[str, RequestOutput]:
        """Step until every given request has finished (others in the engine progress too);
        `on_finished` sees each of them as it finishes (a progress bar)."""
        done: dict[str, RequestOutput] = {}
        pending = set(request_ids)
        while pending:
            outputs = self.step()
            if not outputs and not self.has_unfinished():
                raise RuntimeError("the engine has no work but requests are unfinished")
            for out in outputs:
                if out.finished and out.request_id in pending:
                    done[out.request_id] = out
                    pending.discard(out.request_id)
                    if on_finished is not None:
                        on_finished(out)
        return done


# -- sampling --------------------------------------------------------------------------------------

MIN_TEMPERATURE = 1e-2


def _apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        counts = torch.bincount(torch.tensor(seq.output_token_ids, device=logits.device), minlength=logits.shape[0])
        counts = counts[: logits.shape[0]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _suppress_stops(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Before min_tokens, a stop token may not be chosen."""
    if seq.num_output_tokens < seq.params.min_tokens and seq.stop_token_ids:
        logits[list(seq.stop_token_ids)] = float("-inf")
    return logits


def _draw(logits: torch.Tensor, seq: Sequence) -> int:
    p = seq.params
    # Hostile but valid values must not make the draw fail. A temperature below MIN_TEMPERATURE
    # is used as that (as vLLM does: logits / T would overflow, and T may round to 0 in float32);
    # a tiny repetition penalty still yields +inf, which softmax turns into NaN, so +inf becomes
    # the largest float: the token stays the certain choice.
    scaled = torch.nan_to_num(logits / max(p.temperature, MIN_TEMPERATURE), posinf=torch.finfo(logits.dtype).max)
    if p.top_k > 0 and p.top_k < scaled.shape[0]:
        kth = scaled.topk(p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
        drop = before >= p.top_p * sorted_probs.sum()
        drop[0] = False  # the likeliest token always stays (a tiny top_p may round to 0)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=seq.generator).item())


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token for each row of `logits` ([R, V] float32, row i belongs to seqs[i])."""
    logits = logits.float()
    wants_logprobs = [s.params.logprobs is not None for s in seqs]
    raw_log_probs = torch.log_softmax(logits, dim=-1) if any(wants_logprobs) else None
    shaped = logits
    needs_shaping = [
        s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
        or s.num_output_tokens < s.params.min_tokens
        for s in seqs
    ]
    if any(needs_shaping):
        shaped = logits.clone()
        for i, seq in enumerate(seqs):
            if needs_shaping[i]:
                _suppress_stops(_apply_penalties(shaped[i], seq), seq)
    chosen = shaped.argmax(dim=-1)
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            chosen[i] = _draw(shaped[i].to("cpu"), seq)
    tokens = chosen.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    if raw_log_probs is not None:
        rows = [i for i, w in enumerate(wants_logprobs) if w]
        k = max(seqs[i].params.logprobs for i in rows)
        found = top_logprobs(raw_log_probs[rows], chosen[rows].to(raw_log_probs.device), k)
        for i, lp in zip(rows, found):
            lp.top = lp.top[: seqs[i].params.logprobs]
            logprobs[i] = lp
    return tokens, logprobs
