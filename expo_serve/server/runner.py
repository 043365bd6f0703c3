"""Run the server: load the model into an engine, serve the app with uvicorn, drain on exit.

On SIGINT or SIGTERM the server stops accepting connections, answers new requests on open
connections with 503, lets running requests finish (up to --shutdown-timeout seconds), and then
stops the engine.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

import uvicorn

from .examples import banner
from .settings import ServerSettings

DEMO_MODEL_NAME = "smollm2-135m-expo-demo"
EXAMPLE_ALPHA = 0.3


def build_engine(settings: ServerSettings):
    import torch

    from ..engine.async_engine import AsyncEngine
    from ..engine.llm_engine import EngineConfig, LLMEngine

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = settings.dtype or ("bfloat16" if device == "cuda" else "float32")
    kv_bytes = int(settings.kv_cache_gib * 2**30) if settings.kv_cache_gib else None
    config = EngineConfig(sft=settings.sft, delta=settings.delta, aligned=settings.aligned, dtype=dtype, device=device,
                          max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
                          max_model_len=settings.max_model_len, kv_cache_bytes=kv_bytes,
                          alpha_default=settings.alpha_default, alpha_min=settings.alpha_min,
                          alpha_max=settings.alpha_max)
    return AsyncEngine(LLMEngine(config))


def serve(settings: ServerSettings) -> int:
    """Serve until interrupted; returns the exit code."""
    from .app import create_app
    from .experiments_wiring import build_experiments, mount_experiments

    experiments = build_experiments(settings)  # a bad experiments file fails here, before the model loads

    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    print(f"expo-serve: loading {settings.sft} with Δ from {settings.delta or settings.aligned} …", file=sys.stderr,
          flush=True)
    engine = build_engine(settings)
    try:
        app = create_app(settings, engine, experiments=experiments, shutdown_engine=True)
        mount_experiments(app, experiments, settings)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                timeout_graceful_shutdown=settings.shutdown_timeout)
        server = _Server(config, settings, drain=app.state.serving.gate.close)
        server.run()
    finally:
        engine.shutdown(settings.shutdown_timeout)  # at once if the app already stopped it
    return 0


def serve_demo(pair, host: str = "127.0.0.1", port: int = 8000, *, delta: str | Path | None = None, **options) -> int:
    """Serve the demo pair (expo_serve.demo.pair.DemoPair) until interrupted: θ_sft plus `delta`
    when given (a delta folder built from the pair), else the Δ computed from θ_aligned at start-up.
    `options` are further ServerSettings fields."""
    source = {"delta": str(delta)} if delta is not None else {"aligned": str(pair.aligned_dir)}
    settings = ServerSettings(sft=str(pair.sft_dir), host=host, port=port,
                              model_name=options.pop("model_name", DEMO_MODEL_NAME), **source, **options)
    return serve(settings)


def _example_alpha(settings: ServerSettings) -> float:
    return min(max(EXAMPLE_ALPHA, settings.alpha_min), settings.alpha_max)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class _Server(uvicorn.Server):
    """uvicorn's Server, which also prints the examples once it listens and closes the queue as
    soon as a shutdown begins."""

    def __init__(self, config: uvicorn.Config, settings: ServerSettings, drain: Callable[[], None]):
        super().__init__(config)
        self._settings = settings
        self._drain = drain

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            settings = self._settings
            port = self.servers[0].sockets[0].getsockname()[1]
            url = f"http://{_url_host(settings.host)}:{port}"
            print(banner(url, settings.served_model_name, _example_alpha(settings), bool(settings.api_key)), flush=True)

    def handle_exit(self, sig, frame) -> None:
        self._drain()
        super().handle_exit(sig, frame)
