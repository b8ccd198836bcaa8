"""Rank 0's side of a tensor-parallel engine: it starts the N-1 worker processes, joins them
in one torch.distributed process group, sends them their messages (tp_worker.py lists them)
and watches them.

Start-up: rank 0 makes a private folder (mode 0700) for the rendezvous store (a FileStore: no
socket, so nothing outside the pod, nor another user in it, can read or fill it), starts each
worker as `python -m loraplex.engine.core.tp_worker` with one end of a socket pair, waits for
every worker's hello (a worker that dies on import fails the start at once, with its exit
code), then tells them to join and all ranks join the group (gloo on the CPU, NCCL on CUDA)
through the store. The collectives' own sockets are bound to loopback (LOOPBACK_ENV): tensor
parallelism is single-pod.

Failure: a watchdog thread polls the workers every WATCH_SECONDS. When one exits, the group is
failed: `failure` says why, the other workers are killed (so that a collective rank 0 is
blocked in errors out at once instead of waiting for the timeout), and every later `send`
raises `WorkerGroupError`. The engine then reports itself dead (/health 503) and the server
exits non-zero (api/app.py). Collectives carry the group timeout (--tensor-parallel-timeout),
so none waits forever even if a peer hangs without dying.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection

import torch

from loraplex.engine.core.tp_worker import recv, send

log = logging.getLogger("loraplex.engine.tp")

WATCH_SECONDS = 0.2
START_SECONDS = 300.0  # for a worker's hello: a cold start imports torch (slow on a busy node)
STOP_SECONDS = 5.0  # a worker asked to stop gets this long before it is killed
# Where gloo and NCCL bind their sockets (else the address the host name resolves to: the pod
# IP). Set in rank 0's environment and in its workers'.
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


class WorkerGroupError(RuntimeError):
    """The tensor-parallel group is broken (a worker died or failed); the engine cannot go on."""


class WorkerGroup:
    def __init__(self, size: int, device_type: str, timeout_seconds: float, log_level: str = "warning"):
        self.size = size
        self.device_type = device_type
        self.timeout = datetime.timedelta(seconds=timeout_seconds)
        self.log_level = log_level
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self.failure: str | None = None
        self.store_dir: str | None = None
        self._stopping = False
        self._lock = threading.Lock()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # ---- start-up ---------------------------------------------------------------------------

    def start(self) -> "WorkerGroup":
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError("a torch.distributed process group already exists in this process; "
                               "one tensor-parallel engine per process")
        if self.device_type == "cuda" and torch.cuda.device_count() < self.size:
            raise ValueError(f"--tensor-parallel-size {self.size} needs {self.size} CUDA devices; "
                             f"torch sees {torch.cuda.device_count()}")
        os.environ.update(LOOPBACK_ENV)
        self.store_dir = tempfile.mkdtemp(prefix="loraplex-tp-")  # mode 0700
        store_file = os.path.join(self.store_dir, "store")
        try:
            store = dist.FileStore(store_file, self.size)
            store.set_timeout(self.timeout)
            for rank in range(1, self.size):
                self._spawn(rank, store_file)
            for rank, conn in enumerate(self.conns, start=1):
                self._wait_hello(rank, conn)
            for conn in self.conns:
                send(conn, ("join",))
            if self.device_type == "cuda":
                torch.cuda.set_device(0)
            dist.init_process_group("nccl" if self.device_type == "cuda" else "gloo", store=store, rank=0,
                                    world_size=self.size, timeout=self.timeout)
        except BaseException:
            self.shutdown()
            raise
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()
        log.info("tensor parallel: %d ranks (%s), worker pids %s", self.size, self.device_type, self.pids)
        return self

    def _spawn(self, rank: int, store_file: str) -> None:
        ours, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "loraplex.engine.core.tp_worker", "--rank", str(rank), "--size", str(self.size),
               "--store-file", store_file, "--fd", str(theirs.fileno()), "--device", self.device_type,
               "--timeout", str(self.timeout.total_seconds()), "--log-level", self.log_level]
        # Workers inherit stdout/stderr: their logs land in the engine's.
        self.procs.append(subprocess.Popen(cmd, pass_fds=[theirs.fileno()], close_fds=True,
                                           env={**os.environ, **LOOPBACK_ENV}))
        theirs.close()
        self.conns.append(Connection(ours.detach()))

    def _wait_hello(self, rank: int, conn: Connection) -> None:
        deadline = time.monotonic() + max(START_SECONDS, self.timeout.total_seconds())
        proc = self.procs[rank - 1]
        while not conn.poll(0.1):
            if proc.poll() is not None:
                raise WorkerGroupError(f"tensor-parallel worker {rank} exited with status {proc.returncode} "
                                       "before joining (see its log above)")
            if time.monotonic() > deadline:
                raise WorkerGroupError(f"tensor-parallel worker {rank} did not start within "
                                       f"{max(START_SECONDS, self.timeout.total_seconds()):.0f} s")
        kind, _ = recv(conn)
        assert kind == "hello", kind

    # ---- messages ---------------------------------------------------------------------------

    def check(self) -> None:
        if self.failure is not None:
            raise WorkerGroupError(self.failure)

    def send(self, message, ranks: range | None = None) -> None:
        """One message to every worker (pickled once), or to `ranks` only."""
        self.check()
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for rank in ranks or range(1, self.size):
                self.conns[rank - 1].send_bytes(data)
        except OSError as exc:
            self.fail(f"lost tensor-parallel worker {rank}: {exc}")
            raise WorkerGroupError(self.failure) from exc

    def send_each(self, messages: dict[int, object]) -> None:
        """A message of its own to each worker rank."""
        for rank, message in messages.items():
            self.send(message, range(rank, rank + 1))

    def collect(self) -> list:
        """Every worker's reply to the last command, in rank order. Waits without a deadline of
        its own (a load takes as long as it takes); a dead worker fails it within WATCH_SECONDS."""
        replies = []
        for rank, conn in enumerate(self.conns, start=1):
            while not conn.poll(WATCH_SECONDS):
                self.check()
            try:
                kind, value = recv(conn)
            except (EOFError, OSError) as exc:
                self.fail(f"lost tensor-parallel worker {rank}: {exc}")
                raise WorkerGroupError(self.failure) from exc
            if kind == "error":
                self.fail(value)
                raise WorkerGroupError(value)
            replies.append(value)
        return replies

    # ---- failure and shutdown -----------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping and self.failure is None:
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code is not None and not self._stopping:
                    self.fail(f"tensor-parallel worker {rank} (pid {proc.pid}) exited with status {code}")
                    break
            time.sleep(WATCH_SECONDS)

    def fail_step(self, exc: BaseException) -> None:
        """Rank 0's step raised. A collective that lost its peer errors as soon as the peer's
        socket closes, a moment before the watchdog sees the exit: give the exit that moment, so
        the failure names the worker that died rather than the symptom."""
        deadline = time.monotonic() + 1.0
        while self.failure is None and time.monotonic() < deadline:
            dead = [(rank, p) for rank, p in enumerate(self.procs, start=1) if p.poll() is not None]
            if dead:
                rank, proc = dead[0]
                self.fail(f"tensor-parallel worker {rank} (pid {proc.pid}) exited with status {proc.returncode}")
            else:
                time.sleep(0.05)
        self.fail(f"tensor-parallel step failed on rank 0: {type(exc).__name__}: {exc}")

    def fail(self, reason: str) -> None:
        """Mark the group broken (the first reason wins) and kill the workers left."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
        log.error("%s; the engine stops", reason)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def shutdown(self) -> None:
        """Ask the workers to stop, kill those that do not within STOP_SECONDS, reap them all."""
        self._stopping = True
        data = pickle.dumps(("stop",))
        for conn in self.conns:
            try:
                conn.send_bytes(data)
            except OSError:
                pass
        deadline = time.monotonic() + STOP_SECONDS
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self.conns:
            conn.close()
        if self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
        import torch.distributed as dist

        if dist.is_initialized() and self.failure is None:
            dist.destroy_process_group()  # a later engine in this process (tests) makes its own

