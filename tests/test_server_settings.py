"""The `serve` command's options, derived from ServerSettings: parsing, environment, clear errors."""
from __future__ import annotations

import pytest

from expo_serve.cli import build_parser, main
from expo_serve.errors import ExpoError
from expo_serve.server.settings import ServerSettings, settings_from_args


def _settings(*argv: str) -> ServerSettings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_every_setting_is_an_option_with_help():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    options = {action.dest: action for action in serve._actions if action.dest != "help"}
    assert set(options) == set(ServerSettings.model_fields)
    assert all(action.help for action in options.values())
    for contract in ("--sft", "--delta", "--aligned", "--host", "--port", "--model-name", "--alpha-default",
                     "--alpha-min", "--alpha-max", "--experiments", "--db", "--api-key", "--admin-key", "--device",
                     "--dtype", "--max-num-seqs", "--max-model-len", "--max-queue"):
        assert contract in serve._option_string_actions, contract


def test_options_are_parsed_and_defaults_apply():
    settings = _settings("--sft", "s", "--delta", "d", "--port", "9001", "--alpha-min", "-0.5", "--device", "cpu")
    assert (settings.port, settings.alpha_min, settings.device, settings.host) == (9001, -0.5, "cpu", "127.0.0.1")
    assert settings.served_model_name == "d"
    assert _settings("--sft", "s", "--aligned", "a", "--model-name", "m").served_model_name == "m"


def test_the_environment_fills_in_and_options_win(monkeypatch):
    monkeypatch.setenv("EXPO_SERVE_API_KEY", "secret")
    monkeypatch.setenv("EXPO_SERVE_PORT", "9100")
    settings = _settings("--sft", "s", "--delta", "d")
    assert settings.api_key == "secret" and settings.port == 9100
    assert _settings("--sft", "s", "--delta", "d", "--port", "9200").port == 9200


@pytest.mark.parametrize("argv,message", [
    ((), "--sft (or EXPO_SERVE_SFT) is required"),
    (("--sft", "s"), "give --delta DIR or --aligned SRC"),
    (("--sft", "s", "--delta", "d", "--aligned", "a"), "not both"),
    (("--sft", "s", "--delta", "d", "--port", "http"), "--port (or EXPO_SERVE_PORT) is invalid"),
    (("--sft", "s", "--delta", "d", "--alpha-max", "nan"), "--alpha-max (or EXPO_SERVE_ALPHA_MAX) is invalid"),
    (("--sft", "s", "--delta", "d", "--alpha-default", "30"), "--alpha-default 30.0 is outside"),
    (("--sft", "s", "--delta", "d", "--max-num-seqs", "0"), "--max-num-seqs (or EXPO_SERVE_MAX_NUM_SEQS) is invalid"),
])
def test_bad_settings_are_one_clear_sentence(argv, message):
    with pytest.raises(ExpoError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _settings(*argv)


def test_serve_exits_1_with_the_sentence(capsys):
    assert main(["serve", "--sft", "s"]) == 1
    assert capsys.readouterr().err.startswith("expo-serve: error: give --delta DIR or --aligned SRC")
    # A bad experiments file is reported before any model is loaded (neither path exists).
    assert main(["serve", "--sft", "/nonexistent", "--delta", "/nonexistent", "--experiments", "/nonexistent/x.yaml"]) == 1
    assert "Cannot read the experiments file /nonexistent/x.yaml" in capsys.readouterr().err


def test_alpha_cache_option_reaches_the_engine(pairs):
    from expo_serve.server.runner import build_engine

    sft, aligned = pairs("llama")
    off = build_engine(_settings("--sft", str(sft), "--aligned", str(aligned), "--alpha-cache-gib", "0", "--device", "cpu"))
    on = build_engine(_settings("--sft", str(sft), "--aligned", str(aligned), "--alpha-cache-gib", "0.001", "--device", "cpu"))
    try:
        assert off.engine.runner.alpha_cache is None
        cache = on.engine.runner.alpha_cache
        assert cache.capacity == (2**30 // 1000) // cache.slot_bytes > 0
    finally:
        off.shutdown()
        on.shutdown()


def test_trust_remote_code_is_a_switch_off_by_default(monkeypatch):
    assert _settings("--sft", "s", "--delta", "d").trust_remote_code is False
    assert _settings("--sft", "s", "--delta", "d", "--trust-remote-code").trust_remote_code is True
    monkeypatch.setenv("EXPO_SERVE_TRUST_REMOTE_CODE", "true")
    assert _settings("--sft", "s", "--delta", "d").trust_remote_code is True


def test_every_command_of_the_readme_seed_table_parses():
    """Each seed pair's row names a `serve` command the CLI accepts as written."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## The seed pairs", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^\| `([^`|]+)` \| `[^`]+` \| [^|]+ \| `(expo-serve serve [^`]+)`", table, re.M)
    assert len(commands) == 13  # the card's own pair and the twelve of its tables
    for aligned, command in commands:
        settings = _settings(*shlex.split(command)[2:])
        assert settings.aligned == aligned or settings.delta
        assert settings.trust_remote_code == ("internlm" in aligned)
