"""Experiment definitions: validation and the --experiments file (YAML or JSON)."""
import json

import pytest
from pydantic import ValidationError

from expo_serve.errors import ExpoError
from expo_serve.experiments.config import load_experiments_file, parse_experiment

ISSUE_EXAMPLE = {"key": "alpha-sweep", "unit": "user", "allocation": "fixed", "primary_metric": "thumbs",
                 "arms": [{"name": "control", "alpha": 0.0, "weight": 1, "control": True},
                          {"name": "a03", "alpha": 0.3, "weight": 1}]}


def test_issue_example_parses_with_defaults():
    exp = parse_experiment(ISSUE_EXAMPLE)
    assert exp.status == "running" and exp.control.name == "control"
    assert exp.fixed_weights() == {"control": 0.5, "a03": 0.5}
    assert {g.metric for g in exp.guardrails} == {"latency_s", "output_tokens"}
    assert exp.metric_spec("thumbs").kind == "binary" and exp.metric_spec("latency_s").higher_is_better is False


@pytest.mark.parametrize("patch,needle", [
    ({"arms": [{"name": "a", "alpha": 0, "control": True}]}, "at least 2"),
    ({"arms": [{"name": "a", "alpha": 0}, {"name": "b", "alpha": 1}]}, "exactly one arm"),
    ({"arms": [{"name": "a", "alpha": 0, "control": True}, {"name": "a", "alpha": 1}]}, "unique"),
    ({"arms": [{"name": "a", "alpha": float("nan"), "control": True}, {"name": "b", "alpha": 1}]}, "finite"),
    ({"arms": [{"name": "a", "alpha": 0, "control": True, "weight": 0}, {"name": "b", "alpha": 1}]}, "greater than 0"),
    ({"unit": "session"}, "'user' or 'request'"),
    ({"allocation": "epsilon"}, "'fixed' or 'thompson'"),
    ({"key": "has space"}, "pattern"),
    ({"surprise": 1}, "Extra inputs"),
    ({"metrics": {"latency_s": {"kind": "binary"}}}, "recorded by the server"),
    ({"allocation": "thompson", "thompson": {"floor": 0.5},
      "arms": [{"name": "a", "alpha": 0, "control": True}, {"name": "b", "alpha": 1}, {"name": "c", "alpha": 2}]}, "too large"),
    ({"guardrails": [{"metric": "latency_s"}]}, "max_increase or max_decrease"),
])
def test_invalid_definitions_are_refused(patch, needle):
    with pytest.raises(ValidationError) as info:
        parse_experiment({**ISSUE_EXAMPLE, **patch})
    assert needle in str(info.value)


def test_assignment_signature_ignores_analysis_settings():
    a = parse_experiment(ISSUE_EXAMPLE)
    assert a.assignment_signature() == parse_experiment({**ISSUE_EXAMPLE, "min_sample": 7, "description": "x"}).assignment_signature()
    moved = {**ISSUE_EXAMPLE, "arms": [ISSUE_EXAMPLE["arms"][0], {"name": "a03", "alpha": 0.5, "weight": 1}]}
    assert a.assignment_signature() != parse_experiment(moved).assignment_signature()


def test_yaml_and_json_files(tmp_path):
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text("""
- key: alpha-sweep
  default: true
  arms:
    - {name: control, alpha: 0.0, control: true}
    - {name: a03, alpha: 0.3}
- key: per-request
  unit: request
  allocation: thompson
  arms:
    - {name: c, alpha: 0, control: true}
    - {name: t, alpha: 1.5}
""")
    loaded = load_experiments_file(yaml_file)
    assert [e.key for e in loaded] == ["alpha-sweep", "per-request"] and loaded[0].default
    json_file = tmp_path / "exp.json"
    json_file.write_text(json.dumps({"experiments": [ISSUE_EXAMPLE]}))
    assert load_experiments_file(json_file)[0].key == "alpha-sweep"


@pytest.mark.parametrize("text,needle", [
    ("- key: x\n  arms: []\n", "experiment 1 ('x'): arms"),
    ("{not yaml: [", "not valid YAML"),
    ("key: x\n", "must hold a list"),
    (json.dumps([ISSUE_EXAMPLE, ISSUE_EXAMPLE]), "keys must be unique"),
    (json.dumps([{**ISSUE_EXAMPLE, "default": True}, {**ISSUE_EXAMPLE, "key": "b", "default": True}]), "at most one"),
])
def test_bad_files_fail_with_one_sentence(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ExpoError) as info:
        load_experiments_file(path)
    message = str(info.value)
    assert needle in message and str(path) in message and "\n" not in message.strip()


def test_missing_file(tmp_path):
    with pytest.raises(ExpoError, match="Cannot read the experiments file"):
        load_experiments_file(tmp_path / "nope.yaml")


def test_experiments_never_import_the_engine_model_delta_or_kernels():
    """DESIGN §8: the server resolves an arm to an α; experiments know nothing below that."""
    import subprocess
    import sys

    code = ("import sys, expo_serve.experiments, expo_serve.experiments.api, expo_serve.experiments.dashboard\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'transformers', 'expo_kernels')"
            " or m.startswith(('expo_serve.engine', 'expo_serve.model', 'expo_serve.delta', 'expo_serve.server'))]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_the_installed_package_imports_nothing_from_the_dev_extras():
    """Test and simulation helpers live in tests/ and bench/: serving works with `pip install .` alone."""
    import subprocess
    import sys

    dev_only = ("openai", "httpx", "pytest", "playwright", "psycopg", "schemathesis", "lm_eval")
    code = ("import sys, expo_serve.server.app, expo_serve.experiments, expo_serve.experiments.api, "
            "expo_serve.experiments.dashboard\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(dev_only)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
