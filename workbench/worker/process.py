"""`ProcessWorker`: the worker in its own process, so its timing does not depend on what else runs in the
notebook kernel (issue 9). Same API as the in-process workers:

    w = ProcessWorker("cpu", config, on_result)        # or "cuda"; blocks until the executor process is ready
    w.submit(action); ...; w.close()

- The executor process (`workbench.worker.host`) hosts a CPUWorker/CUDAWorker and owns its weights cache. It is
  started and supervised from one long-lived thread here (the "supervisor"), which also reads its results and
  calls `on_result(result)` (never from inside `submit`).
- Actions and results cross a socketpair as `workbench.contract.encode` dicts; Infer inputs and outputs cross
  in shared memory (host.py explains the layout). On CUDA the shared memory is page-locked in the child.
- It dies with this process: PR_SET_PDEATHSIG in the child, plus the child exits when the channel reaches EOF.
- If it dies (crash, kill -9), every action in flight gets one ErrorResult(RUNTIME_ERROR, "executor process
  died ..."), a fresh process is started, `restarts` goes up and `on_restart(restarts)` is called: the new
  process has no models, so the controller must reset its view and load them again.
- Times in results are `time.monotonic_ns()` of the child: one system-wide clock on Linux, the session's too.

The plain `CPUWorker`/`CUDAWorker` remain the in-process mode for debugging; they are NOT isolated (their
executor threads share the kernel's interpreter lock). `start_worker(device, isolated=...)` picks either.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from workbench.contract import Action, ErrorResult, Infer, Result, Status, error, id_problem
from workbench.worker.config import WorkerConfig
from workbench.worker.host import (Channel, SharedIO, compact_infer, fast_decode, fast_encode, infer_result_from_compact,
                                   read_arrays, shm_bytes, write_arrays)
from workbench.worker.pools import MemoryPool, PoolExhausted

DEFAULT_SHM_BYTES = 64 << 20   # per direction; Infers whose arrays do not fit are sent inline


class WorkerProcessError(RuntimeError):
    """The executor process could not be started (the message carries its own error or its log's tail)."""


class _Flight:
    """An action the session has submitted and not yet seen answered."""
    __slots__ = ("action", "gen", "slot")

    def __init__(self, action: Action, gen: int | None):
        self.action, self.gen, self.slot = action, gen, -1


class _Generation:
    """One executor process and its channel."""

    def __init__(self, n: int, proc: subprocess.Popen, chan: Channel, info: dict, log: Any):
        self.n, self.proc, self.chan, self.info, self.log = n, proc, chan, info, log
        self.close_sent = False


def _signal_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ProcessWorker:
    """The worker in an isolated executor process. `ProcessWorker(device, config, on_result, num_gpus=None,
    devices=None, on_restart=None, ...)`; `device` is "cpu" or "cuda". Options:

    - on_restart(restarts): called (from the supervisor thread) after a crashed executor was replaced;
    - max_restarts: stop restarting after this many (None: always restart); later actions then fail;
    - shm_bytes: shared memory for Infer inputs, and as much for outputs (0: everything inline);
    - switch_interval: `sys.setswitchinterval` in the child (None: Python's 5 ms, which measured ~15% faster
      round trips on the CPU device than 0.5 ms: the child has no busy thread to preempt);
    - env: extra environment for the child (e.g. {"CUDA_VISIBLE_DEVICES": "1"}, {"TVM_NUM_THREADS": "1"});
    - cpus: CPU numbers the executor process (all its threads) is confined to (sched_setaffinity), e.g. cores
      the notebook kernel does not use; None: wherever the OS schedules it;
    - sync_each_page: passed to CUDAWorker; start_timeout: seconds to wait for the child to be ready.
    """

    isolated = True

    def __init__(self, device: str = "cpu", config: WorkerConfig | None = None,
                 on_result: Callable[[Result], None] | None = None, num_gpus: int | None = None,
                 devices: Sequence[int] | None = None, *, on_restart: Callable[[int], None] | None = None,
                 max_restarts: int | None = None, shm_bytes: int = DEFAULT_SHM_BYTES,
                 switch_interval: float | None = None, env: dict[str, str] | None = None,
                 sync_each_page: bool = False, start_timeout: float = 180.0, cpus: Sequence[int] | None = None):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"ProcessWorker device must be 'cpu' or 'cuda', got {device!r} (EmulatedWorker runs "
                             f"on the controller's clock and needs no process)")
        if cpus is not None:
            cpus = sorted(set(cpus))
            n = os.cpu_count() or 0
            if not cpus or not hasattr(os, "sched_setaffinity") or not all(0 <= c < n for c in cpus):
                raise ValueError(f"ProcessWorker cpus={cpus}: pick CPU numbers of this machine (0..{n - 1})"
                                 if hasattr(os, "sched_setaffinity") else
                                 "ProcessWorker cpus: this OS has no CPU affinity (sched_setaffinity)")
        self.device = device
        self.config = config or WorkerConfig.load()
        self.on_result = on_result or (lambda r: None)
        self.on_restart = on_restart
        self.max_restarts = max_restarts
        self.restarts = 0
        self.start_timeout = start_timeout
        self._init = {"device": device, "num_gpus": num_gpus, "devices": list(devices) if devices else None,
                      "sync_each_page": sync_each_page, "switch_interval": switch_interval, "cpus": cpus,
                      "config": {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}}
        self._env = dict(env or {})
        self._lock = threading.Lock()          # state: flights, pool, generation, local results
        self._send_lock = threading.Lock()     # order of writes on the channel; held across a crash reset
        self._flights: dict[int, _Flight] = {}
        self._pending: list[Action] = []       # submitted while no process was up (restarting)
        self._local: collections.deque[Result] = collections.deque()   # answered here, delivered by supervisor
        self._gen: _Generation | None = None
        self._state = "starting"               # starting | running | restarting | closing | closed | broken
        self._broken_reason = ""
        self._shm: SharedIO | None = None
        self._pool: MemoryPool | None = None
        if shm_bytes > 0 and hasattr(os, "memfd_create"):
            self._shm = SharedIO.create(shm_bytes, shm_bytes)
            self._pool = MemoryPool("shared input", shm_bytes)
        self._init.update(in_bytes=self._shm.in_bytes if self._shm else 0,
                          out_bytes=self._shm.out_bytes if self._shm else 0)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._starting: subprocess.Popen | None = None      # a child being started (close() may kill it)
        self._finalize_in_supervisor = False
        self.num_gpus = 0
        self.pid = 0
        self.info: dict = {}
        # Children are started from this thread only: PR_SET_PDEATHSIG fires when the *thread* that forked
        # the child ends, so the forking thread must live as long as the worker.
        self._supervisor = threading.Thread(target=self._supervise, name=f"process-worker-{device}", daemon=True)
        self._supervisor.start()
        self._ready.wait()
        if self._start_error is not None:
            self._supervisor.join(timeout=10)
            self._release()
            raise self._start_error

    # ------------------------------------------------------------------------------------------ public API
    def submit(self, action: Action, *, answer_here: bool = False) -> None:
        """As Worker.submit; results come from the reader thread (`answer_here` is for the worker in the process
        that hosts it, whose host passes it)."""
        if not isinstance(action, Action):
            raise TypeError(f"submit() takes a workbench.contract Action, got {type(action).__name__}")
        with self._send_lock:
            with self._lock:
                state = self._state
                if state in ("closing", "closed", "broken"):
                    now = time.monotonic_ns()
                    if state == "broken":
                        r = error(action, Status.RUNTIME_ERROR, self._broken_reason, now, now)
                    else:
                        r = error(action, Status.SHUTTING_DOWN, "worker is closed", now, now)
                    if state != "closing":  # no supervisor any more: answer here, as the in-process worker does
                        deliver_now = r
                    else:   # never tracked: must not untrack an action in flight with the same id
                        self._local_result(r, track=False)
                        return
                elif (why := id_problem(action.id)) is not None or action.id in self._flights:
                    now = time.monotonic_ns()           # never tracked: see Worker.submit
                    self._local_result(error(action, Status.INVALID_ACTION,
                                             why or f"action id {action.id} is already in flight", now, now),
                                       track=False)
                    return
                else:
                    deliver_now = None
                    if state != "running":
                        self._flights[action.id] = _Flight(action, None)
                        self._pending.append(action)
                        return
                    flight = self._flights[action.id] = _Flight(action, self._gen.n)
                    chan = self._gen.chan
                    frame = self._frame(flight)
            if deliver_now is not None:
                self._call(deliver_now)
                return
            if frame is None:
                return
            try:
                chan.send_frames([frame])
            except OSError:
                pass   # the process died: the supervisor sees EOF and answers every action in flight

    def close(self, timeout: float = 30.0) -> None:
        """Close the executor process (actions not yet run get SHUTTING_DOWN) and release everything. Called
        from `on_result` (the supervisor thread), it asks for the close and returns; the supervisor finishes it."""
        with self._lock:
            if self._state in ("closed", "closing"):
                return
            self._state = "closing"
        self._wake()
        if threading.current_thread() is self._supervisor:
            self._finalize_in_supervisor = True
            return
        self._supervisor.join(timeout)
        self._finalize()

    def _finalize(self) -> None:
        for proc in (self._gen.proc if self._gen else None, self._starting):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        with self._lock:
            left = [f.action for f in self._flights.values()]
            self._flights.clear()
            self._pending.clear()
            local = list(self._local)
            self._local.clear()
            self._state = "closed"
        now = time.monotonic_ns()
        for r in local + [error(a, Status.SHUTTING_DOWN, "worker closed", now, now) for a in left]:
            self._call(r)
        self._release()

    def in_flight(self) -> int:
        """Actions submitted and not yet answered."""
        with self._lock:
            return len(self._flights)

    @property
    def alive(self) -> bool:
        gen = self._gen
        return gen is not None and gen.proc.poll() is None and self._state == "running"

    def __repr__(self) -> str:
        return (f"ProcessWorker({self.device}, isolated: executor process pid {self.pid}, {self.num_gpus} gpu(s), "
                f"{self._state}, restarts={self.restarts})")

    # ----------------------------------------------------------------------------------- sending actions
    def _frame(self, flight: _Flight) -> bytes | None:
        """The frame for an action (caller holds both locks); None if answered locally (cannot be sent)."""
        a, refs = flight.action, None
        try:
            if isinstance(a, Infer) and self._pool is not None and (n := shm_bytes(a.inputs)) is not None:
                try:
                    flight.slot = self._pool.alloc(n)
                except PoolExhausted:
                    flight.slot = -1          # shared memory full: this one goes inline
                if flight.slot >= 0:
                    refs = write_arrays(self._shm.inputs, flight.slot, a.inputs)
                    v = compact_infer(a)
                    if v is not None:
                        return Channel.frame(("A", v, refs))
                    return Channel.frame(("a", fast_encode(a, skip="inputs"), refs))
            return Channel.frame(("a", fast_encode(a), refs))
        except Exception as e:  # noqa: BLE001 - unsendable (e.g. unpicklable field): the action's error result
            self._free(flight)
            self._flights.pop(flight.action.id, None)
            now = time.monotonic_ns()
            self._local_result(error(flight.action, Status.INVALID_ACTION,
                                     f"action cannot be sent to the executor process: {type(e).__name__}: {e}",
                                     now, now), track=False)
            return None

    def _free(self, flight: _Flight) -> None:
        if flight.slot >= 0 and self._pool is not None:
            self._pool.free(flight.slot)
            flight.slot = -1

    def _local_result(self, r: Result, track: bool = True) -> None:
        """Queue a result made here for the supervisor to deliver (caller holds the lock)."""
        if track:
            self._flights.pop(r.id, None)
        self._local.append(r)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass   # already awake

    def _call(self, r: Result) -> None:
        try:
            self.on_result(r)
        except Exception:  # noqa: BLE001 - the receiver's bug must not stop the supervisor
            traceback.print_exc()

    # ------------------------------------------------------------------------------------- supervision
    def _supervise(self) -> None:
        try:
            self._supervise_loop()
        finally:
            if self._finalize_in_supervisor:
                self._finalize()

    def _supervise_loop(self) -> None:
        n = 0
        while True:
            try:
                gen = self._start(n)
            except BaseException as e:  # noqa: BLE001
                if n == 0:
                    self._start_error = e
                    self._ready.set()
                    return
                if self._state not in ("closing", "closed"):
                    self._break(f"executor process could not be restarted: {e}")
                return
            with self._send_lock, self._lock:
                closing = self._state in ("closing", "closed")   # "closed": close() gave up waiting for us
                self._gen = gen
                self.pid, self.info = gen.info["pid"], gen.info
                self.num_gpus = gen.info["num_gpus"]
                if not closing:
                    self._state = "running"
                    pending, self._pending = self._pending, []
                    frames = []
                    for a in pending:
                        flight = self._flights.get(a.id)
                        if flight is None:
                            continue
                        flight.gen = gen.n
                        if (frame := self._frame(flight)) is not None:
                            frames.append(frame)
                    try:
                        if frames:
                            gen.chan.send_frames(frames)
                    except OSError:
                        pass
            if n == 0:
                self._ready.set()
            elif self.on_restart is not None and not closing:
                try:
                    self.on_restart(self.restarts)
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
            outcome = self._serve(gen)
            if outcome == "closed":
                return
            # The process died: answer what it held, then replace it.
            code = self._reap(gen)
            with self._send_lock, self._lock:
                dead = [f for f in self._flights.values() if f.gen == gen.n]
                for f in dead:
                    del self._flights[f.action.id]
                if self._pool is not None:
                    self._pool.clear()       # nothing of this generation is in flight any more
                    self._shm.read_pos.value = 0
                closing = self._state in ("closing", "closed")
                if not closing:
                    self._state = "restarting"
            tail = self._log_tail(gen.log)
            gen.log.close()
            now = time.monotonic_ns()
            why = (f"executor process died (pid {gen.info['pid']}, {_signal_name(code)}) with this action in "
                   f"flight" + (f"; its last output: {tail}" if tail else ""))
            if closing:
                for f in dead:
                    self._call(error(f.action, Status.SHUTTING_DOWN, "worker closed; " + why, now, now))
                self._deliver_local()
                return
            restart = self.max_restarts is None or self.restarts < self.max_restarts
            why += ("; a new executor process is being started: models must be loaded again" if restart
                    else f"; not restarted (max_restarts={self.max_restarts})")
            for f in dead:
                self._call(error(f.action, Status.RUNTIME_ERROR, why, now, now))
            self._deliver_local()
            if not restart:
                self._break(f"executor process died ({_signal_name(code)}) and max_restarts={self.max_restarts} "
                            f"was reached: create a new worker")
                return
            self.restarts += 1
            n += 1

    def _break(self, reason: str) -> None:
        with self._lock:
            self._state, self._broken_reason = "broken", reason
            left = [f.action for f in self._flights.values()]
            self._flights.clear()
            self._pending.clear()
        now = time.monotonic_ns()
        for a in left:
            self._call(error(a, Status.RUNTIME_ERROR, reason, now, now))
        self._deliver_local()

    def _start(self, n: int) -> _Generation:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {**os.environ, **self._env, "PYTHONUNBUFFERED": "1"}
        root = str(Path(__file__).resolve().parents[2])     # the directory holding the workbench package
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        fds = [child.fileno()] + ([self._shm.fd] if self._shm else [])
        log = tempfile.TemporaryFile(prefix="workbench-executor-")   # unlinked: nothing left behind, ever
        try:
            cpus = self._init["cpus"]
            # confined before anything starts a thread (importing numpy starts its BLAS threads): all inherit it
            start = (["-m", "workbench.worker.host"] if not cpus else
                     ["-c", f"import os, sys; os.sched_setaffinity(0, {cpus!r}); "
                            "from workbench.worker.host import main; sys.exit(main())"])
            proc = self._starting = subprocess.Popen(
                [sys.executable, *start, "--fd", str(child.fileno()), "--ppid",
                 str(os.getpid()), "--shm-fd", str(self._shm.fd if self._shm else -1)],
                pass_fds=fds, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        except BaseException:
            parent.close()
            log.close()
            raise
        finally:
            child.close()
        chan = Channel(parent)
        try:
            chan.send(("init", self._init))
            msg = self._await_ready(chan, proc, log)
        except BaseException:
            proc.kill()
            proc.wait()
            chan.close()
            log.close()
            raise
        finally:
            self._starting = None
        if msg[0] == "fatal":
            proc.wait(30)
            chan.close()
            log.close()
            raise WorkerProcessError(f"the {self.device} executor process failed to start: {msg[1]}")
        return _Generation(n, proc, chan, msg[1], log)

    def _await_ready(self, chan: Channel, proc: subprocess.Popen, log: Any) -> tuple:
        parent = chan.sock
        parent.settimeout(1.0)
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                try:
                    msgs = chan.recv()
                    return msgs[0]
                except socket.timeout:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        break
                except (EOFError, OSError):
                    proc.wait(10)
                    break
        finally:
            parent.settimeout(None)
        code = proc.poll()
        what = (f"exited ({_signal_name(code)})" if code is not None
                else f"was not ready after {self.start_timeout:.0f} s")
        tail = self._log_tail(log)
        raise WorkerProcessError(f"the {self.device} executor process {what}"
                                 + (f"; its output: {tail}" if tail else ""))

    @staticmethod
    def _log_tail(log: Any, limit: int = 2000) -> str:
        """The end of what the child wrote (pread: the file offset is shared with the child's stdout)."""
        try:
            fd = log.fileno()
            size = os.fstat(fd).st_size
            data = os.pread(fd, limit, max(0, size - limit))
        except (OSError, ValueError):
            return ""
        return data.decode(errors="replace").strip()

    def _serve(self, gen: _Generation) -> str:
        """Deliver results until the process ends: "closed" (after close) or "died"."""
        poll = select.poll()
        sock_fd = gen.chan.sock.fileno()
        poll.register(sock_fd, select.POLLIN)
        poll.register(self._wake_r, select.POLLIN)
        while True:
            for fd, _ in poll.poll():
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self._deliver_local()
                    if self._state == "closing" and not gen.close_sent:
                        gen.close_sent = True
                        try:
                            with self._send_lock:
                                gen.chan.send(("close",))
                        except OSError:
                            pass
                    continue
                try:
                    msgs = gen.chan.recv()
                except (EOFError, OSError):
                    return "closed" if gen.close_sent and self._finish_close(gen) else "died"
                except Exception:  # noqa: BLE001 - a corrupt stream: this executor is no use any more
                    traceback.print_exc()
                    gen.proc.kill()
                    return "died"
                for m in msgs:
                    try:
                        if m[0] == "R":
                            self._compact_result(m[1], m[2])
                        elif m[0] == "r":
                            self._result(m[1], m[2])
                        elif m[0] == "closed":
                            self._finish_close(gen)
                            return "closed"
                        else:
                            print(f"ProcessWorker: unexpected message {m[0]!r} from the executor", file=sys.stderr)
                    except Exception:  # noqa: BLE001 - a bug here must not stop result delivery
                        traceback.print_exc()

    def _finish_close(self, gen: _Generation) -> bool:
        try:
            gen.proc.wait(30)
        except subprocess.TimeoutExpired:
            gen.proc.kill()
            gen.proc.wait(10)
        gen.chan.close()
        gen.log.close()
        self._deliver_local()
        return True

    def _reap(self, gen: _Generation) -> int | None:
        try:
            return gen.proc.wait(10)
        except subprocess.TimeoutExpired:   # closed its end but hangs: it is no use any more
            gen.proc.kill()
            return gen.proc.wait(10)
        finally:
            gen.chan.close()

    def _result(self, d: dict, refs: Any) -> None:
        problem = ""
        if refs is not None:   # outputs in the shared ring: copy them out, then let the child reuse the bytes
            arrays, end = refs
            try:
                d["outputs"] = read_arrays(self._shm.outputs, arrays, copy=True)
            except Exception as e:  # noqa: BLE001 - answered as the action's error below
                problem = f"outputs could not be read from shared memory: {type(e).__name__}: {e}"
            self._shm.read_pos.value = end
        try:
            r = fast_decode(d)
        except Exception as e:  # noqa: BLE001 - a result we cannot read is a bug: say which action
            print(f"ProcessWorker: undecodable result for action {d.get('id')!r}: {e}", file=sys.stderr)
            return
        self._answer(r, problem)

    def _compact_result(self, v: tuple, refs: Any) -> None:
        """An InferResult in compact form, its outputs in the shared ring (host.py)."""
        problem, outputs = "", None
        arrays, end = refs
        try:
            outputs = tuple(read_arrays(self._shm.outputs, arrays, copy=True))
        except Exception as e:  # noqa: BLE001 - answered as the action's error below
            problem = f"outputs could not be read from shared memory: {type(e).__name__}: {e}"
        self._shm.read_pos.value = end
        try:
            r = infer_result_from_compact(v, outputs)
        except Exception as e:  # noqa: BLE001 - a result we cannot read is a bug: say which action
            print(f"ProcessWorker: undecodable result for action {v[0] if v else None!r}: {e}", file=sys.stderr)
            return
        self._answer(r, problem)

    def _answer(self, r: Result, problem: str) -> None:
        if problem:
            r = ErrorResult(id=r.id, action_type=r.action_type, status=Status.RUNTIME_ERROR, message=problem,
                            received=r.received, sent=r.sent)
        with self._lock:
            f = self._flights.pop(r.id, None)
            if f is not None:
                self._free(f)
        if f is None:
            print(f"ProcessWorker: result for action {r.id} ({r.status.name}) that is not in flight dropped",
                  file=sys.stderr)
            return
        self._call(r)

    def _deliver_local(self) -> None:
        while True:
            with self._lock:
                if not self._local:
                    return
                r = self._local.popleft()
            self._call(r)

    def _release(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        if self._shm is not None:
            self._shm.close()
            os.close(self._shm.fd)
            self._shm = None
        if self._gen is not None:
            self._gen.log.close()


def start_worker(device: str = "cpu", config: WorkerConfig | None = None,
                 on_result: Callable[[Result], None] | None = None, *, isolated: bool = True, **kw: Any) -> Any:
    """A worker for `device` ("cpu" or "cuda"): a ProcessWorker (isolated, the default), or with
    isolated=False the plain in-process CPUWorker/CUDAWorker, for debugging only: NOT isolated, its executor
    threads wait for the interpreter lock whenever other Python runs in the kernel."""
    if isolated:
        return ProcessWorker(device, config, on_result, **kw)
    if device == "cpu":
        from workbench.worker.cpu import CPUWorker
        return CPUWorker(config, on_result, num_gpus=kw.get("num_gpus") or 1)
    if device == "cuda":
        from workbench.worker.cuda import CUDAWorker
        return CUDAWorker(config, on_result, num_gpus=kw.get("num_gpus"), devices=kw.get("devices"),
                          sync_each_page=kw.get("sync_each_page", False))
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
