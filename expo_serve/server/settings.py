"""The server's settings: one pydantic-settings model; the `serve` command's options derive from it.

Each field is an option (`max_num_seqs` is `--max-num-seqs`) and an environment variable
(`EXPO_SERVE_MAX_NUM_SEQS`); the command line wins over the environment. Keys are better passed
through the environment, where other users of the machine cannot read them in the process list.
"""
from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..engine.request import AlphaRange
from ..errors import ExpoError

ENV_PREFIX = "EXPO_SERVE_"


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    sft: str = Field(json_schema_extra={"metavar": "SRC"}, description="SFT model: Hugging Face folder, .gguf file or hub id")
    delta: str | None = Field(None, json_schema_extra={"metavar": "DIR"}, description="delta folder from `expo-serve delta build` (or give --aligned)")
    aligned: str | None = Field(None, json_schema_extra={"metavar": "SRC"}, description="aligned (DPO/RLHF) model: Δ is computed from it at start-up")
    host: str = Field("127.0.0.1", json_schema_extra={"metavar": "H"}, description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, json_schema_extra={"metavar": "P"}, description="port to listen on (0: any free port)")
    model_name: str | None = Field(None, min_length=1, json_schema_extra={"metavar": "NAME"}, description="the model id clients send (default: the name of the --delta or --aligned folder)")
    alpha_default: float = Field(0.0, allow_inf_nan=False, json_schema_extra={"metavar": "A"}, description="α of requests that name none (0 serves θ_aligned)")
    alpha_min: float = Field(-1.0, allow_inf_nan=False, json_schema_extra={"metavar": "A"}, description="smallest α a request may ask for (-1 is θ_sft)")
    alpha_max: float = Field(25.0, allow_inf_nan=False, json_schema_extra={"metavar": "A"}, description="largest α a request may ask for")
    experiments: str | None = Field(None, json_schema_extra={"metavar": "FILE"}, description="YAML or JSON file of α experiments (A/B tests)")
    db: str | None = Field(None, json_schema_extra={"metavar": "URL"}, description="experiment store URL (sqlite:///… or postgresql://…)")
    api_key: str | None = Field(None, min_length=1, json_schema_extra={"metavar": "KEY"}, description="require `Authorization: Bearer KEY` on every route but /health, /metrics and the API docs (better: set EXPO_SERVE_API_KEY)")
    admin_key: str | None = Field(None, min_length=1, json_schema_extra={"metavar": "KEY"}, description="key for the admin routes (better: set EXPO_SERVE_ADMIN_KEY)")
    metrics_require_key: bool = Field(False, json_schema_extra={"metavar": "true|false"}, description="with --api-key, /metrics needs the key too")
    device: Literal["cpu", "cuda"] | None = Field(None, description="where the model runs (default: cuda when available)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="weight dtype (default: float32 on cpu, bfloat16 on cuda)")
    max_num_seqs: int = Field(64, gt=0, description="sequences the engine runs at once")
    max_num_batched_tokens: int | None = Field(None, gt=0, description="tokens one engine step computes at most; longer prompts are prefilled in chunks (default: 2048 on CUDA, 512 on a CPU, where a shorter step brings first tokens sooner)")
    max_model_len: int | None = Field(None, gt=0, description="context window: prompt plus output tokens (default: the model's, at most 4096)")
    max_tokens_default: int = Field(1024, gt=0, description="output tokens of a request that sets no max_tokens (fewer when the context window has less room)")
    tensor_parallel_size: int = Field(1, ge=1, description="ranks the model is split over (tensor parallelism): one GPU each on CUDA, processes on a CPU")
    kv_cache_gib: float | None = Field(None, gt=0, allow_inf_nan=False, description="KV-cache size in GiB, per rank (default: most of the free GPU memory; on a CPU a quarter of free memory, at most 4, shared by the ranks)")
    alpha_cache_gib: float | None = Field(None, ge=0, allow_inf_nan=False, description="memory for merged weights of the hot α values, W + (1+α)Δ, so their rows run one plain product (default: on a CPU one α's merged weights, if at most an eighth of available memory; on CUDA 0, off)")
    max_queue: int = Field(256, ge=0, description="sequences that may wait beyond --max-num-seqs; past that, requests get 503 with Retry-After")
    max_body_bytes: int = Field(8 * 2**20, gt=0, description="largest request body accepted (413 beyond)")
    shutdown_timeout: float = Field(30.0, ge=0, allow_inf_nan=False, description="seconds a shutdown waits for running requests to finish")
    trust_remote_code: bool = Field(False, json_schema_extra={"flag": True}, description="let a tokenizer shipped as code with the checkpoint (InternLM2's), with no tokenizer.json beside it, run that code")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="server log level")

    @model_validator(mode="after")
    def _check(self) -> "ServerSettings":
        if self.delta and self.aligned:
            raise ValueError("give either --delta or --aligned, not both")
        if not (self.delta or self.aligned):
            raise ValueError("give --delta DIR or --aligned SRC: the server needs Δ = θ_aligned − θ_sft")
        try:
            self.alpha_range
        except ValueError:
            raise ValueError(f"--alpha-default {self.alpha_default} is outside [--alpha-min {self.alpha_min}, "
                             f"--alpha-max {self.alpha_max}]") from None
        return self

    @property
    def alpha_range(self) -> AlphaRange:
        """The engine's α bounds (AlphaRange is their one owner and judge)."""
        return AlphaRange(default=self.alpha_default, min=self.alpha_min, max=self.alpha_max)

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.delta or self.aligned or self.sft).name or "expo"


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser, model: type[BaseSettings] = ServerSettings) -> None:
    """One option per settings field, help from its description. Values go to the model as text,
    so pydantic does all parsing and checking, the same way for options and environment variables.
    Unset options are absent from the namespace (the environment, then the default, applies)."""
    for name, field in model.model_fields.items():
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("flag"):
            # A switch that is off unless given: the option takes no value.
            parser.add_argument(option_name(name), dest=name, default=argparse.SUPPRESS, action="store_const",
                                const="true", help=field.description)
            continue
        choices = _literal_choices(field.annotation)
        default = "" if field.is_required() or field.default is None else f" (default: {field.default})"
        parser.add_argument(option_name(name), dest=name, default=argparse.SUPPRESS, choices=choices,
                            metavar=None if choices else _metavar(field),
                            help=f"{field.description}{default}")


def settings_from_args(args: argparse.Namespace, model: type[BaseSettings] = ServerSettings):
    """The settings from parsed options plus the environment; a bad value is one clear sentence."""
    given = {name: value for name, value in vars(args).items() if name in model.model_fields}
    try:
        return model(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        if where:
            source = f"{option_name(where)} (or {ENV_PREFIX}{where.upper()})"
            message = "is required" if error["type"] == "missing" else f"is invalid: {error['msg']}"
            raise ExpoError(f"{source} {message}") from None
        raise ExpoError(str(error["msg"]).removeprefix("Value error, ")) from None


def _literal_choices(annotation) -> list[str] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is Literal:
            return list(typing.get_args(arg))
    return None


def _metavar(field) -> str:
    if isinstance(field.json_schema_extra, dict) and "metavar" in field.json_schema_extra:
        return str(field.json_schema_extra["metavar"])
    kinds = {int: "N", float: "X", str: "TEXT"}
    for arg in (field.annotation, *typing.get_args(field.annotation)):
        if arg in kinds:
            return kinds[arg]
    return "VALUE"
