"""The process-concurrent in-process transport: several clients trained at once.

``runtime.transport: processes`` with ``runtime.workers`` and
``runtime.threads_per_worker``. Worker processes are forked from the parent the first
time the transport is used, that is AFTER the workbench has loaded the base model: they
share its weights copy-on-write (the frozen weights are never written, so their pages
stay shared; only the trainable State, the encoded examples of the clients a worker
served and the optimizer state are private). There is never one model copy per worker.

Each worker runs the one client function (``runtime/client.py`` ``handle``) with
``torch.set_num_threads(threads_per_worker)`` and sends back the reply. A client's
training depends only on its message, its seed and its store on disk, so the replies
are bit-identical to the sequential transport's at the same thread count per client
(``runtime.threads`` equal to ``threads_per_worker``); the loop reads them in the
order it sent them, so aggregation sums in the same order too.

A client that raises is a failed reply, as in the sequential transport. A worker that
dies (``os._exit``, a signal, the kernel's OOM killer) is a failed reply for the client it
was serving, naming the exit code; a fresh worker is forked in its place and the round
goes on. The client store lives on disk (runtime/store.py): every message re-establishes
its client's staging tag, so a client can be served by any worker in any phase.

Written here, not with ``multiprocessing.Pool`` or ``concurrent.futures``: a Pool hangs
on a worker that dies mid-task, and ``ProcessPoolExecutor`` turns one dead worker into a
``BrokenProcessPool`` for every outstanding task, where a dead worker must fail exactly
one client.

With ``runtime.parent_trains: true`` the run's own process trains clients too, between
handing envelopes to the workers: the same concurrency with one process fewer, so one
training working set less in memory (docs/speed.md). It trains with
``threads_per_worker`` threads (then restores the run's thread count), so its replies are
the same bits as a worker's. While it trains, it looks after the workers at each of its
client's steps (the learner's ``on_step``): a worker that finished gets the next client at
once instead of waiting for the parent's client to end. A client that kills the process
it trains in takes the run down when the parent trains it, as on the sequential transport.

CUDA cannot be used in a forked process, so ``processes`` needs ``runtime.device: cpu``
(refused at config time otherwise), and a process that has already used CUDA (an earlier
run in the same interpreter) cannot fork workers that train: autograd's device threads do
not survive the fork, and every client failed (seen on an H200), so the transport refuses
to start there (``cuda_used``). Nor can GNU OpenMP (libgomp, the OpenMP runtime of
the PyPI torch wheels): once the parent has run a parallel region on several threads (its
evaluation does), a forked child that runs one on several threads waits forever for the
parent's pool threads, which do not exist in the child. With libgomp, ``threads_per_worker``
above 1 is therefore refused at config time (``gnu_openmp``); several one-thread workers
give the same concurrency. Workers are forked as the round needs them: never more than
the clients waiting to be served, whatever ``runtime.workers`` says.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import multiprocessing as mp
import os
import signal
from multiprocessing.connection import Connection, wait
from typing import Callable, Sequence

from fedfm.core.protocols import Envelope, Reply
from fedfm.runtime.client import ClientEnv, handle

log = logging.getLogger("fedfm.runtime")


def transport_problem(exp) -> str | None:
    """``runtime.transport: processes`` settings that cannot work; None when fine."""
    rt = exp.runtime
    if rt.transport != "processes":
        if rt.parent_trains:
            return f"runtime.parent_trains: true needs runtime.transport: processes (got '{rt.transport}')"
        for name in ("workers", "threads_per_worker"):
            value = getattr(rt, name)
            if value != type(rt).model_fields[name].default:
                return f"runtime.{name}: {value} needs runtime.transport: processes (got '{rt.transport}')"
        return None
    if rt.backend != "local":
        return f"runtime.transport: processes is the local backend's transport; runtime.backend is '{rt.backend}'"
    if rt.device != "cpu":
        return (f"runtime.transport: processes needs runtime.device: cpu (got '{rt.device}'): "
                "CUDA cannot be used in forked worker processes")
    if "fork" not in mp.get_all_start_methods():
        return "runtime.transport: processes needs the 'fork' start method, which this platform lacks"
    return threads_problem(rt.threads_per_worker)


@functools.lru_cache(maxsize=1)
def gnu_openmp() -> bool:
    """Whether torch's OpenMP runtime in this process is GNU libgomp (read from the
    process's mapped libraries; False where they cannot be read)."""
    import torch  # noqa: F401  (loads torch's OpenMP runtime)

    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


def threads_problem(threads_per_worker: int) -> str | None:
    """``runtime.threads_per_worker`` above 1 under GNU OpenMP: a forked worker would hang
    in its first multi-threaded operation (module doc); None when fine."""
    if threads_per_worker > 1 and gnu_openmp():
        return (f"runtime.threads_per_worker: {threads_per_worker}: this torch uses GNU OpenMP (libgomp), under which "
                "a worker forked after the run's process computed on several threads hangs in its first "
                "multi-threaded operation; use runtime.threads_per_worker: 1 and more runtime.workers instead")
    return None


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(threads_per_worker: int, parent_trains: bool = False) -> int:
    return max(1, available_cores() // threads_per_worker - (1 if parent_trains else 0))


def cuda_used() -> bool:
    """Whether this process has initialised CUDA (its autograd may then hold device threads,
    which a forked worker cannot use: seen on an H200 after a CUDA run in the same process)."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_initialized())


def hide_cuda(torch) -> None:
    """CUDA cannot be used in a forked child once the parent touched the driver (libraries
    call ``torch.cuda.is_available()`` on import); a CPU worker that then asks for CUDA
    state (``torch.random.fork_rng``, seeding helpers) fails with "CUDA error:
    initialization error". Workers train on the CPU only (the processes transport refuses
    ``runtime.device: cuda``), so CUDA is made to look absent in them."""
    torch.cuda.is_available = lambda: False
    torch.cuda.device_count = lambda: 0


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def trim() -> None:
    """Give the heap's free pages back to the OS after a client (glibc ``malloc_trim``).

    glibc keeps the memory a client's training freed (activations, gradients) in the
    process's heap; each worker, and the parent with ``parent_trains``, would hold on to
    the largest heap any client ever needed, on top of what is shared. Trimming after each
    client lowers the peak memory of the process tree (docs/speed.md: 1,244 -> 1,166 MB on
    one quickstart round with one worker and the parent); the next client faults its pages
    in again."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def answer(env: ClientEnv, envelope: Envelope) -> Reply:
    """The client function's reply to one envelope; a client that raises is a failed reply."""
    try:
        data, info = handle(env, envelope)
        return Reply(envelope.cid, data=data, info=info)
    except Exception as exc:  # a client's failure never stops the round
        return Reply(envelope.cid, error=f"{type(exc).__name__}: {exc}")


def _worker(env: ClientEnv, conn: Connection, threads: int) -> None:
    """A worker's life: answer envelopes until the parent closes the pipe."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(threads)
    hide_cuda(torch)
    env.on_step = None  # progress bars are the parent's
    while True:
        try:
            envelope = conn.recv()
        except (EOFError, OSError):
            return
        if envelope is None:
            return
        conn.send(answer(env, envelope))
        trim()


class _Slot:
    """One worker process, its end of the pipe and the envelope it is serving."""

    def __init__(self, env: ClientEnv, threads: int):
        gc.collect()
        gc.freeze()  # the parent's objects leave the collector's lists: the child's GC never writes their pages
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(env, child, threads), daemon=True)
        self.proc.start()
        child.close()
        self.busy: Envelope | None = None

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class ProcessTransport:
    name = "local"

    def __init__(
        self,
        env: ClientEnv,
        workers: int | None = None,
        threads_per_worker: int = 1,
        on_start: Callable[[int], None] | None = None,
        on_end: Callable[[], None] | None = None,
        parent_trains: bool = False,
    ):
        problem = threads_problem(threads_per_worker)
        if problem is not None:
            raise ValueError(problem)
        if cuda_used():
            raise RuntimeError(
                "runtime.transport: processes: this process has already used CUDA (an earlier run in the same "
                "interpreter, say), and PyTorch's autograd cannot train in a process forked after that (every "
                "client would fail: 'Unable to handle autograd's threading in combination with fork-based "
                "multiprocessing'); start the run in a fresh process")
        if workers is not None and workers < 1:
            raise ValueError(f"runtime.workers must be >= 1, got {workers}")
        self.env = env
        self.threads = threads_per_worker
        self.parent_trains = parent_trains
        self.workers = workers or default_workers(threads_per_worker, parent_trains)
        cores = available_cores()
        used = self.workers * threads_per_worker + (threads_per_worker if parent_trains else 0)
        if used > cores:
            log.warning("runtime.workers %d x runtime.threads_per_worker %d%s = %d threads on %d CPU cores: "
                        "the workers will compete for the cores", self.workers, threads_per_worker,
                        " + the parent's" if parent_trains else "", used, cores)
        self.on_start, self.on_end = on_start, on_end
        self.slots: list[_Slot] = []
        self.restarts = 0  # workers forked again after one died

    def _ensure(self, waiting: int) -> None:
        """Fork the workers now (after the model is loaded), and again for any that died;
        no more than ``waiting`` idle ones (the clients still to hand out)."""
        for i, slot in enumerate(self.slots):
            if slot.busy is None and not slot.proc.is_alive():
                slot.proc.join()
                slot.conn.close()
                self.slots[i] = _Slot(self.env, self.threads)
                self.restarts += 1
        idle = sum(1 for s in self.slots if s.busy is None)
        while len(self.slots) < self.workers and idle < waiting:
            self.slots.append(_Slot(self.env, self.threads))
            idle += 1

    def _finish(self, slot: _Slot, reply: Reply, replies: dict[int, Reply]) -> None:
        replies[slot.busy.cid] = reply
        slot.busy = None
        if self.on_end is not None:
            self.on_end()

    def _train_here(self, envelope: Envelope, queue: list[Envelope], replies: dict[int, Reply]) -> Reply:
        """One client in the parent, with a worker's thread count (``parent_trains``); at
        each of its steps, finished workers are collected and given the next client."""
        import torch

        if self.on_start is not None:
            self.on_start(envelope.cid)
        threads, on_step = torch.get_num_threads(), self.env.on_step
        torch.set_num_threads(self.threads)
        self.env.on_step = lambda step, total: self._serve(queue, replies, timeout=0)  # the bars count clients
        try:
            reply = answer(self.env, envelope)
        finally:
            torch.set_num_threads(threads)
            self.env.on_step = on_step
            trim()
        if self.on_end is not None:
            self.on_end()
        return reply

    def _dispatch(self, queue: list[Envelope], replies: dict[int, Reply]) -> None:
        """The next envelopes of ``queue`` to the idle workers that are alive."""
        for slot in self.slots:
            if slot.busy is None and queue and slot.proc.is_alive():
                envelope = queue.pop(0)
                if self.on_start is not None:
                    self.on_start(envelope.cid)
                slot.busy = envelope
                try:
                    slot.conn.send(envelope)
                except Exception as exc:  # a closed pipe, or a message that cannot be pickled
                    self._finish(slot, Reply(envelope.cid, error=f"could not send to the worker: {type(exc).__name__}: {exc}"), replies)

    def _serve(self, queue: list[Envelope], replies: dict[int, Reply], timeout: float | None) -> None:
        """Collect the replies that are ready (waiting up to ``timeout``), then keep the
        workers busy with what is left in ``queue``."""
        busy = [s for s in self.slots if s.busy is not None]
        if busy:
            ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy], timeout=timeout)
            for slot in busy:
                if slot.conn in ready or slot.proc.sentinel in ready:
                    self._collect(slot, replies)
        self._dispatch(queue, replies)

    def exchange(self, envelopes: Sequence[Envelope], timeout: float | None = None) -> dict[int, Reply]:
        replies: dict[int, Reply] = {}
        queue = list(envelopes)
        while queue or any(s.busy is not None for s in self.slots):
            self._ensure(len(queue) - (1 if self.parent_trains else 0))
            self._dispatch(queue, replies)
            if self.parent_trains and queue:  # the workers are busy: the parent takes the next client
                envelope = queue.pop(0)
                replies[envelope.cid] = self._train_here(envelope, queue, replies)
            waiting = self.parent_trains and bool(queue)  # collect what is ready, then train the next one here
            self._serve(queue, replies, timeout=0 if waiting else None)
        return replies

    def _collect(self, slot: _Slot, replies: dict[int, Reply]) -> None:
        """The reply of ``slot``'s client, or a failed reply if its worker died."""
        try:
            if slot.conn.poll():
                self._finish(slot, slot.conn.recv(), replies)
                return
        except Exception:  # EOF or a half-written reply: the worker died while sending
            pass
        if slot.proc.is_alive():
            return  # woken by the pipe with nothing to read yet
        slot.proc.join()
        code = slot.proc.exitcode
        cid = slot.busy.cid
        log.warning("worker process %d serving client %d died (exit code %s); forking a new one", slot.proc.pid, cid, code)
        self._finish(slot, Reply(cid, error=f"worker process died while serving the client (exit code {code})"), replies)

    def close(self) -> None:
        for slot in self.slots:
            slot.stop()
        self.slots = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
