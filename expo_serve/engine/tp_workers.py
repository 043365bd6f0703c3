"""Tensor parallelism's processes: rank 0 (the engine's process: scheduler, sampler, its own shard)
and N-1 workers that the engine starts (torch.multiprocessing, spawn), each running the model on
its shard with the inputs rank 0 sends it every step.

Start-up: rank 0 checks that the model splits, starts the workers, and loads its own shard while
they load theirs (each reads only its slices of θ_sft and Δ); a worker reports its held bytes or
its error in one sentence. Then every rank joins one process group (gloo on a CPU, NCCL on CUDA
with one device a rank), rank 0 says how big the KV cache is, and each builds its runner (CUDA
graphs are captured in step, collectives included).

Each step rank 0 sends the step's inputs (tp_messages) through a pipe to every worker, then all
ranks run the same forward: the all-reduces and the logits gather pair up. A worker waits for its
next step on the pipe, never in a collective, so an idle server has no timeout to meet.

Failure: a monitor thread on rank 0 watches the workers' sentinels; a worker that exits while
the engine runs sets `failure`, which the engine reads before every step (the server then
answers 503 and exits non-zero). A worker exits when rank 0 says stop, when its pipe closes, or when rank 0's process is
gone (it checks its parent), so no rank outlives the engine. Workers ignore SIGINT: Ctrl-C reaches
the whole process group, and rank 0 alone decides how to stop.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from ..errors import ExpoError
from ..model.loader import LoadedModel, load_model
from ..model.parallel import TensorParallel, held_bytes
from .model_runner import ModelRunner, StepInputs
from .tp_messages import STOP, decode_step, encode_step

log = logging.getLogger("expo_serve.engine")

START_TIMEOUT_S = 600.0  # loading a 70B shard from a cold disk takes minutes
STOP_TIMEOUT_S = 10.0


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: str, rank: int) -> torch.device:
    """One CUDA device per rank (cuda:rank); every rank of a CPU run on the CPU."""
    return torch.device("cuda", rank) if torch.device(device).type == "cuda" else torch.device("cpu")


class Workers:
    """Rank 0's side: the worker processes, their pipes, and the monitor. `start` returns with
    rank 0's shard loaded and every worker's loaded; `runner` then builds the runners."""

    def __init__(self, spec: dict, size: int):
        self.size = size
        self.spec = spec
        self.failure: str | None = None
        self.rank_bytes: list[int] = []
        self._closed = False
        self._group_started = False
        self._threads_before: int | None = None
        self._reaping = threading.Lock()
        self._dir = tempfile.mkdtemp(prefix="expo-tp-")
        self._rendezvous = f"file://{self._dir}/rendezvous"
        context = torch.multiprocessing.get_context("spawn")
        self.processes, self.pipes = [], []
        for rank in range(1, size):
            ours, theirs = context.Pipe()
            process = context.Process(target=worker_main, args=(rank, size, spec, theirs, self._rendezvous),
                                      name=f"expo-tp-rank{rank}", daemon=True)
            process.start()
            theirs.close()
            self.processes.append(process)
            self.pipes.append(ours)
        atexit.register(self.close)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    @classmethod
    def start(cls, spec: dict, size: int) -> tuple["Workers", LoadedModel]:
        """Check the split, start the workers, load rank 0's shard; return once all are loaded."""
        from ..delta.sources import open_source

        if dist.is_initialized():
            raise ExpoError("this process already runs a tensor-parallel engine; close it before starting another")
        device = torch.device(spec["device"])
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ExpoError(f"tensor_parallel_size {size} needs {size} CUDA devices (one a rank); "
                            f"{torch.cuda.device_count()} are visible")
        TensorParallel.check(open_source(spec["sft"]).config, size)  # before any process starts
        if device.type == "cpu":
            # The ranks share the machine's cores: each takes its share, or every rank's threads
            # would spin against the others' (on the 2-core dev machine: 24 times slower steps).
            spec = dict(spec, threads=max(1, torch.get_num_threads() // size))
        workers = cls(spec, size)
        try:
            if "threads" in spec:
                workers._threads_before = torch.get_num_threads()
                torch.set_num_threads(spec["threads"])
            if device.type == "cuda":
                torch.cuda.set_device(rank_device(spec["device"], 0))  # NCCL's device for rank 0
            tp = TensorParallel(0, size)
            loaded = load_model(spec["sft"], delta=spec["delta"], aligned=spec["aligned"], dtype=spec["dtype"],
                                device=rank_device(spec["device"], 0), tp=tp, trust_remote_code=spec["trust_remote_code"])
            workers.rank_bytes = [held_bytes(loaded.model), *(m["held_bytes"] for m in workers._gather("loaded"))]
            dist.init_process_group(_backend(loaded.device), init_method=workers._rendezvous, rank=0, world_size=size)
            workers._group_started = True
        except BaseException:
            workers.close()
            raise
        log.info("Tensor parallel over %d ranks (%s): held θ_sft + Δ per rank %s; worker pids %s", size,
                 _backend(loaded.device), ", ".join(f"rank {r} {b / 2**20:.1f} MiB" for r, b in enumerate(workers.rank_bytes)),
                 ", ".join(f"rank {r + 1} {pid}" for r, pid in enumerate(workers.pids)))
        return workers, loaded

    def runner(self, loaded: LoadedModel, block_size: int, num_blocks: int, *, max_num_seqs: int, max_model_len: int,
               cuda_graphs: bool, alpha_cache_bytes: int) -> "TensorParallelRunner":
        """Rank 0's runner, built in step with every worker's (same KV blocks, same graphs)."""
        options = dict(block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                       max_model_len=max_model_len, cuda_graphs=cuda_graphs)
        try:
            for pipe in self.pipes:
                pipe.send_bytes(json.dumps(options).encode())
            runner = TensorParallelRunner(self, loaded, block_size, num_blocks, max_num_seqs=max_num_seqs,
                                          max_model_len=max_model_len, cuda_graphs=cuda_graphs,
                                          alpha_cache_bytes=alpha_cache_bytes)
            self._gather("ready")
        except BaseException:
            self.close()
            raise
        threading.Thread(target=self._monitor, name="expo-tp-monitor", daemon=True).start()
        return runner

    def _gather(self, what: str) -> list[dict]:
        """Each worker's next message (`what` or an error), waiting while the worker lives."""
        replies = []
        deadline = time.monotonic() + START_TIMEOUT_S
        for rank, (pipe, process) in enumerate(zip(self.pipes, self.processes), start=1):
            while not pipe.poll(0.2):
                if not process.is_alive():
                    raise ExpoError(f"tensor-parallel rank {rank} exited with code {process.exitcode} before it was {what}")
                if time.monotonic() > deadline:
                    raise ExpoError(f"tensor-parallel rank {rank} was not {what} within {START_TIMEOUT_S:.0f} s")
            reply = json.loads(pipe.recv_bytes())
            if "error" in reply:
                raise ExpoError(f"tensor-parallel rank {rank}: {reply['error']}")
            replies.append(reply)
        return replies

    def send(self, message: bytes) -> None:
        for pipe in self.pipes:
            pipe.send_bytes(message)

    def _monitor(self) -> None:
        ready = wait([p.sentinel for p in self.processes])
        if self._closed or not ready:
            return
        self.fail(self.dead_worker() or "a tensor-parallel worker exited")

    def dead_worker(self, wait_s: float = 0.0) -> str | None:
        """Which worker has exited, in words, waiting up to `wait_s` for one to (None: all live).
        Exits are read from the sentinels (ready at exit, reaped or not); one thread reaps at a
        time, since two concurrent waitpid calls would leave one seeing a live process."""
        ready = set(wait([p.sentinel for p in self.processes], timeout=wait_s))
        with self._reaping:
            for rank, process in enumerate(self.processes, start=1):
                if process.sentinel in ready:
                    process.join(1.0)
                    code = "" if process.exitcode is None else f" with code {process.exitcode}"
                    return f"tensor-parallel worker rank {rank} (pid {process.pid}) exited{code}"
        return None

    def fail(self, reason: str) -> None:
        """The ranks can no longer run in step: record why, once (the engine reads it)."""
        if self.failure is not None:
            return
        self.failure = reason
        log.error("%s: the engine cannot run another step", reason)

    def close(self) -> None:
        """Stop every worker (politely, then by force) and leave the process group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for pipe in self.pipes:
            try:
                pipe.send_bytes(STOP)
            except OSError:  # that worker is gone already
                pass
        # Leaving the group first frees a worker still waiting in a collective of a failed step.
        if self._group_started and dist.is_initialized():
            dist.destroy_process_group()
        # Before the group is formed a worker may be waiting in its rendezvous: no polite way out.
        deadline = time.monotonic() + (STOP_TIMEOUT_S if self._group_started else 0.0)
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5.0)
        for pipe in self.pipes:
            pipe.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: before each forward, the step's inputs and the α-cache slots filled or
    dropped since the last step go to every worker, which replays them on its shard."""

    def __init__(self, workers: Workers, *args, **options):
        self.workers = workers
        self._events: list[tuple[int, float | None]] = []
        super().__init__(*args, **options)

    def _fill_slot(self, slot: int, alpha: float) -> None:
        super()._fill_slot(slot, alpha)
        self._events.append((slot, alpha))

    def _drop_slot(self, slot: int) -> None:
        super()._drop_slot(slot)
        self._events.append((slot, None))

    def run(self, inputs: StepInputs) -> list[torch.Tensor]:
        try:  # LLMEngine.step has checked self.workers.failure
            self.workers.send(encode_step(inputs, self._events))
            self._events = []
            return super().run(inputs)
        except BaseException as exc:
            # The workers may be waiting in a collective this rank never reached: out of step for good.
            # A worker killed mid-step closes its sockets a moment before it can be reaped.
            dead = self.workers.dead_worker(wait_s=1.0)
            self.workers.fail(dead or f"rank 0's step failed ({type(exc).__name__}: {exc})")
            raise


# -- a worker process --------------------------------------------------------------------------------

def worker_main(rank: int, size: int, spec: dict, pipe, rendezvous: str) -> None:
    """The life of worker `rank`: load its shard, join the group, build its runner, then run every
    step rank 0 sends until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    device = rank_device(spec["device"], rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "threads" in spec:
        torch.set_num_threads(spec["threads"])
    try:
        loaded = load_model(spec["sft"], delta=spec["delta"], aligned=spec["aligned"], dtype=spec["dtype"], device=device,
                            tp=TensorParallel(rank, size), checks=False)
    except Exception as exc:  # one sentence back to rank 0, which refuses to start with it
        sentence = str(exc) if isinstance(exc, ExpoError) else f"{type(exc).__name__}: {exc}"
        pipe.send_bytes(json.dumps({"error": sentence}).encode())
        raise SystemExit(1)
    pipe.send_bytes(json.dumps({"held_bytes": held_bytes(loaded.model)}).encode())
    dist.init_process_group(_backend(device), init_method=rendezvous, rank=rank, world_size=size)
    options = json.loads(pipe.recv_bytes())
    runner = ModelRunner(loaded, options["block_size"], options["num_blocks"], max_num_seqs=options["max_num_seqs"],
                         max_model_len=options["max_model_len"], cuda_graphs=options["cuda_graphs"], alpha_cache_bytes=0)
    pipe.send_bytes(b'{"ready": true}')
    model = loaded.model
    with torch.inference_mode():
        while True:
            try:
                message = pipe.recv_bytes()
            except EOFError:  # rank 0 is gone
                break
            if message == STOP:
                break
            inputs, events = decode_step(message)
            for slot, alpha in events:
                if alpha is None:
                    model.drop_alpha_slot(slot)
                else:
                    model.fill_alpha_slot(slot, alpha)
            runner.run(inputs)
    dist.destroy_process_group()


def _exit_with_parent(parent: int) -> None:
    """Rank 0 killed outright closes no pipe a collective waits on: leave when it is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)
