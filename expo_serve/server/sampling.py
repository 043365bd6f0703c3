"""A request body's sampling fields -> the engine's SamplingParams (which checks their ranges)."""
from __future__ import annotations

from ..engine.request import SamplingParams
from .errors import invalid
from .protocol import GenerationRequest

# Request fields that map one to one; a field left out (None) keeps the engine's default.
_SAME_NAME = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
              "repetition_penalty", "stop_token_ids")


def sampling_params(body: GenerationRequest, *, max_tokens: int | None, default_max_tokens: int | None,
                    logprobs: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine parameters of `body`, α left for the server to decide. With no `max_tokens`,
    the engine generates up to `default_max_tokens` (the server's cap), fewer if the window has less room."""
    if body.stream_options is not None and not body.stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
    if body.logit_bias:
        raise invalid("'logit_bias' is not supported by this server.", param="logit_bias",
                      code="unsupported_parameter")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    options = {name: getattr(body, name) for name in _SAME_NAME if getattr(body, name) is not None}
    return SamplingParams(alpha=None, max_tokens=max_tokens, default_max_tokens=default_max_tokens, stop=stop,
                          ignore_eos=body.ignore_eos, min_tokens=body.min_tokens, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, n=body.n, skip_special_tokens=body.skip_special_tokens,
                          **options)
