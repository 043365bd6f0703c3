"""Experiment definitions: arms, metrics, guardrails, allocation settings, validation, file loading."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ExpoError

SLUG = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
METRIC_NAME = r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$"
MAX_ARMS = 8


class MetricSpec(BaseModel):
    """How a metric is analysed: binary (0/1, Wilson/Beta) or numeric (t), and which way is good."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["binary", "numeric"]
    higher_is_better: bool = True


# Metrics the server records itself for every exposure; feedback may not use these names.
IMPLICIT_METRICS: dict[str, MetricSpec] = {
    "latency_s": MetricSpec(kind="numeric", higher_is_better=False),
    "ttft_s": MetricSpec(kind="numeric", higher_is_better=False),
    "output_tokens": MetricSpec(kind="numeric", higher_is_better=False),
    "aborted": MetricSpec(kind="binary", higher_is_better=False),
    "truncated": MetricSpec(kind="binary", higher_is_better=False),  # finish_reason == "length"
}
# Feedback names with a conventional meaning; any other name is declared in `metrics` or inferred.
BUILTIN_FEEDBACK: dict[str, MetricSpec] = {
    "thumbs": MetricSpec(kind="binary", higher_is_better=True),
    "rating": MetricSpec(kind="numeric", higher_is_better=True),
}


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=SLUG)
    alpha: float = Field(allow_inf_nan=False)
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    control: bool = False


class Guardrail(BaseModel):
    """A metric that must not move against control by more than a relative bound.

    `max_increase: 0.25` fails when the always-valid interval for the relative lift lies wholly
    above +25%; it is at risk when only the point estimate does.
    """

    model_config = ConfigDict(extra="forbid")
    metric: str = Field(pattern=METRIC_NAME)
    max_increase: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_decrease: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_bound(self):
        if self.max_increase is None and self.max_decrease is None:
            raise ValueError("a guardrail needs max_increase or max_decrease")
        return self


def _default_guardrails() -> list[Guardrail]:
    # ExPO lengthens answers and so slows them: watch both by default.
    return [Guardrail(metric="latency_s", max_increase=0.25),
            Guardrail(metric="output_tokens", max_increase=0.5)]


class ThompsonSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    burn_in: int = Field(default=50, ge=0, description="units per arm with primary-metric data before weights adapt")
    floor: float = Field(default=0.05, ge=0, le=0.5, description="minimum weight of every arm")
    update_every_s: float = Field(default=60.0, gt=0, allow_inf_nan=False)


class Experiment(BaseModel):
    """One experiment as an operator writes it (file or admin route)."""

    model_config = ConfigDict(extra="forbid")
    key: str = Field(pattern=SLUG)
    description: str = ""
    unit: Literal["user", "request"] = "user"
    allocation: Literal["fixed", "thompson"] = "fixed"
    status: Literal["draft", "running", "stopped"] = "running"
    default: bool = False
    primary_metric: str = Field(default="thumbs", pattern=METRIC_NAME)
    arms: list[Arm] = Field(min_length=2, max_length=MAX_ARMS)
    metrics: dict[str, MetricSpec] = Field(default_factory=dict)
    guardrails: list[Guardrail] = Field(default_factory=_default_guardrails)
    min_sample: int = Field(default=100, ge=1, description="units per arm with primary-metric data before a winner is named")
    significance: float = Field(default=0.05, gt=0, lt=0.5, allow_inf_nan=False)
    p_best_threshold: float = Field(default=0.95, gt=0.5, lt=1)
    sequential_tuning_n: int = Field(default=1000, ge=10, description="units per arm at which the always-valid interval is tightest")
    seed: str | None = Field(default=None, max_length=128)
    thompson: ThompsonSettings = Field(default_factory=ThompsonSettings)

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, metrics: dict[str, MetricSpec]):
        import re

        for name, spec in metrics.items():
            if not re.match(METRIC_NAME, name):
                raise ValueError(f"metric name {name!r} is not a valid name")
            builtin = IMPLICIT_METRICS.get(name)
            if builtin is not None and builtin.kind != spec.kind:
                raise ValueError(f"metric {name!r} is recorded by the server as {builtin.kind}")
        return metrics

    @model_validator(mode="after")
    def _arms_consistent(self):
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        controls = [arm.name for arm in self.arms if arm.control]
        if len(controls) != 1:
            raise ValueError(f"exactly one arm must have control: true, got {len(controls)}")
        if self.allocation == "thompson" and self.thompson.floor * len(self.arms) > 1:
            raise ValueError(f"thompson.floor {self.thompson.floor} is too large for {len(self.arms)} arms")
        return self

    @property
    def control(self) -> Arm:
        return next(arm for arm in self.arms if arm.control)

    def arm(self, name: str) -> Arm | None:
        return next((arm for arm in self.arms if arm.name == name), None)

    def fixed_weights(self) -> dict[str, float]:
        total = sum(arm.weight for arm in self.arms)
        return {arm.name: arm.weight / total for arm in self.arms}

    def metric_spec(self, name: str) -> MetricSpec | None:
        """The declared or built-in spec; None means 'infer from the data'."""
        return self.metrics.get(name) or IMPLICIT_METRICS.get(name) or BUILTIN_FEEDBACK.get(name)

    def assignment_signature(self) -> str:
        """What decides who gets which arm: changing it while running starts a new phase."""
        relevant = {"unit": self.unit, "allocation": self.allocation, "seed": self.seed,
                    "arms": [arm.model_dump() for arm in self.arms]}
        return json.dumps(relevant, sort_keys=True)


def parse_experiment(data: object) -> Experiment:
    """Validate one definition; raises pydantic's ValidationError."""
    return Experiment.model_validate(data)


def first_error(exc: ValidationError) -> tuple[str, str | None]:
    """One sentence and a dotted `param` for the first validation problem."""
    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err.get("loc", ()) if part != "__root__")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


def validate_collection(experiments: list[Experiment]) -> None:
    keys = [e.key for e in experiments]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"experiment keys must be unique, repeated: {', '.join(dupes)}")
    defaults = [e.key for e in experiments if e.default]
    if len(defaults) > 1:
        raise ValueError(f"at most one experiment may be the default, got {', '.join(defaults)}")


def load_experiments_file(path: str | Path) -> list[Experiment]:
    """Read a YAML or JSON file holding a list of experiments (or {"experiments": [...]})."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExpoError(f"Cannot read the experiments file {path}: {exc.strerror or exc}.") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ExpoError(f"The experiments file {path} is not valid JSON: {exc.msg} at line {exc.lineno}.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ExpoError(f"The experiments file {path} is not valid YAML: {problem}{where}.") from None
    if isinstance(data, dict) and "experiments" in data:
        data = data["experiments"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise ExpoError(f"The experiments file {path} must hold a list of experiments.")
    experiments = []
    for index, item in enumerate(data):
        label = f"experiment {index + 1}" + (f" ({item.get('key')!r})" if isinstance(item, dict) and item.get("key") else "")
        try:
            experiments.append(parse_experiment(item))
        except ValidationError as exc:
            message, _ = first_error(exc)
            raise ExpoError(f"In the experiments file {path}, {label}: {message}.") from None
    try:
        validate_collection(experiments)
    except ValueError as exc:
        raise ExpoError(f"In the experiments file {path}: {exc}.") from None
    return experiments
