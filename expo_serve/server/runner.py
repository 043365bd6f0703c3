"""Run the server: load the model into an engine, serve the app with uvicorn, drain on exit.

On SIGINT or SIGTERM the server drains (middleware.Drain): it keeps listening and answers every new
request, the health check included, with 503 and Retry-After, while running requests finish; at
--shutdown-timeout it cuts what is left (streams end with an error event and [DONE]). Only then
does uvicorn close its listeners and the app stop the engine, and `serve` returns 0. A second
signal cuts at once.

If the engine fails (a tensor-parallel rank died), /health answers 503 `failed` for FAILED_HOLD_S,
so that a balancer's probe sees why, and then `serve` returns 1: loudly, within seconds.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
import uvicorn

from .middleware import Drain
from .examples import banner
from .settings import ServerSettings

DEMO_MODEL_NAME = "smollm2-135m-expo-demo"
EXAMPLE_ALPHA = 0.3
UVICORN_GRACE_S = 2.0
FAILED_HOLD_S = 2.0  # how long a failed engine's server keeps answering 503 before it exits

log = logging.getLogger("expo_serve.server")


def build_engine(settings: ServerSettings):
    import torch

    from ..engine.async_engine import AsyncEngine
    from ..engine.llm_engine import EngineConfig, LLMEngine

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = settings.dtype or ("bfloat16" if device == "cuda" else "float32")
    kv_bytes = int(settings.kv_cache_gib * 2**30) if settings.kv_cache_gib else None
    alpha_cache = int(settings.alpha_cache_gib * 2**30) if settings.alpha_cache_gib is not None else None
    config = EngineConfig(sft=settings.sft, delta=settings.delta, aligned=settings.aligned, dtype=dtype, device=device,
                          max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
                          max_model_len=settings.max_model_len, kv_cache_bytes=kv_bytes, alpha_cache_bytes=alpha_cache,
                          alpha=settings.alpha_range, tensor_parallel_size=settings.tensor_parallel_size,
                          trust_remote_code=settings.trust_remote_code)
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
        # uvicorn's own graceful wait comes after the drain, which leaves it nothing to wait for.
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                timeout_graceful_shutdown=UVICORN_GRACE_S)
        server = _Server(config, settings, app.state.drain, engine)
        server.run()
    finally:
        engine.shutdown(settings.shutdown_timeout)  # at once if the app already stopped it
    if engine.failure is not None:
        log.error("Stopped: %s", engine.failure)
        return 1
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
    """uvicorn's Server, which also prints the examples once it listens, and on a signal drains
    before it lets uvicorn shut down (uvicorn would close its listeners at once, and raise the
    signal again at the end, so that the process would end with -15 instead of 0)."""

    def __init__(self, config: uvicorn.Config, settings: ServerSettings, drain: Drain, engine):
        super().__init__(config)
        self._settings = settings
        self._drain = drain
        self._drain_logged = False
        self._engine = engine
        self._failed_at: float | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            settings = self._settings
            port = self.servers[0].sockets[0].getsockname()[1]
            url = f"http://{_url_host(settings.host)}:{port}"
            print(banner(url, settings.served_model_name, _example_alpha(settings), bool(settings.api_key)), flush=True)

    def handle_exit(self, sig, frame) -> None:
        # A signal handler: only flags are set here; on_tick (on the event loop) does the rest.
        if self._drain.deadline is None:
            self._drain.begin()
        else:
            self._drain.cut_now()

    async def on_tick(self, counter: int) -> bool:
        drain = self._drain
        if self._engine.failure is not None:  # a rank died: the engine cannot run again
            if self._failed_at is None:
                self._failed_at = time.monotonic()
                log.error("The engine failed (%s): stopping in %g s", self._engine.failure, FAILED_HOLD_S)
                drain.begin(0.0)
            if time.monotonic() - self._failed_at >= FAILED_HOLD_S:
                self.should_exit = True
                return True
            return await super().on_tick(counter)
        if drain.deadline is not None and not self._drain_logged:
            self._drain_logged = True
            log.info("Draining: %d request(s) running, new ones get 503; stopping when they are done or in %g s",
                     drain.active, drain.timeout_s)
        if await super().on_tick(counter):
            return True
        if drain.poll():
            self.should_exit = True
            return True
        return False
