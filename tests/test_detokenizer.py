"""The text of a finished sequence is the tokenizer's decode of its tokens, whatever ended it, and
the pieces streamed along the way join up to it: bytes of a character that never completes are
flushed at the end (as U+FFFD, exactly as `tokenizer.decode` gives them), never dropped."""
from __future__ import annotations

import pytest

from expo_serve import LLM, SamplingParams
from expo_serve.engine.request import SamplingParams as Params, Sequence


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per byte of `text`: byte-level BPE has a token for every byte, spelled with
    GPT-2's byte-to-character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in table)})
    return tokenizer.convert_tokens_to_ids([table[b] for b in text.encode()])


def streamed(seq: Sequence, tokens: list[int], end) -> tuple[str, list[str]]:
    """Feed tokens as the engine would, collecting the streamed pieces; `end` finishes the sequence."""
    pieces, sent = [], ""
    for token in tokens:
        seq.append(token, None)
        text = seq.snapshot().text
        pieces.append(text[len(sent):])
        sent = text
        if seq.finished:
            break
    if not seq.finished:
        end(seq)
    final = seq.snapshot().text
    pieces.append(final[len(sent):])
    return final, pieces


@pytest.mark.parametrize("reason", ["length", "stop_token", "abort"])
def test_incomplete_character_at_the_end_is_flushed(pairs, reason):
    from transformers import AutoTokenizer

    _, aligned = pairs("llama")
    tok = AutoTokenizer.from_pretrained(aligned)
    hello = tok.encode("Hello world", add_special_tokens=False)
    cut = byte_tokens(tok, "Ң")[:1] + byte_tokens(tok, "é")[:1] * 3  # four lead bytes, none completed
    output = hello + cut
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    max_tokens = len(output) if reason == "length" else len(output) + 5
    seq = Sequence("r", 0, tok.encode("Say:", add_special_tokens=False), Params(max_tokens=max_tokens), 0.0,
                   max_tokens, {eos}, tok, None)
    feed = output + ([eos] if reason == "stop_token" else [])
    final, pieces = streamed(seq, feed, lambda s: s.finish("abort"))
    assert seq.finish_reason == ("stop" if reason == "stop_token" else reason)
    expected = tok.decode(output, skip_special_tokens=True)
    assert expected.endswith("\ufffd" * 4)
    assert final == expected
    assert "".join(pieces) == final


def test_generated_text_equals_decode_of_its_tokens(pairs):
    """Sampled at a high temperature, the tiny model emits stray byte tokens: every output's text,
    streamed or not, is still the decode of its tokens."""
    sft, aligned = pairs("llama")
    llm = LLM(str(sft), aligned=str(aligned))
    params = [SamplingParams(alpha=a, max_tokens=24, temperature=3.0, seed=s, ignore_eos=True) for s, a in
              enumerate([0.0, 0.3, 1.0, 2.5] * 3)]
    outs = llm.generate(["Hello"] * len(params), params)
    for out in outs:
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert any("\ufffd" in out.text for out in outs), "no partial character sampled: the test shows nothing"
