"""NIXL transfers between built-in engine cores: the data path after the side channel (``check --transfer``).

A handshake proves the side channel; what breaks next in production is the
data path: UCX on another interface than the side channel, RDMA that does
not reach the next rack, a firewall that lets 5600 through but not UCX. With
``--transfer`` each built-in rank becomes a real NIXL agent (UCX backend),
named after its engine id, with a DRAM buffer whose bytes follow from its
rank (``pattern``), and advertises the agent's metadata and the buffer (base
address, length) in its handshake payload, in vLLM's ``NixlAgentMetadata``.
Asked to check its peers, it fetches each peer's payload over the side
channel, adds the peer's agent, READs the peer's buffer into its own scratch
buffer, verifies every byte, and reports latency, bandwidth and what UCX used
for the read, from UCX's own protocol log.

UCX follows the rank's address: ``UCX_TLS=tcp`` and ``UCX_NET_DEVICES=<the
interface holding it>`` unless the user set them (left to itself UCX picks
among every interface, or shared memory between two ranks of one host, and
the check would prove another path than vLLM's side channel uses). NIXL
1.5.1's progress thread spins a core at its default delay of 0, with no
setting for it: the rank runs none and drives progress itself: while its own
read waits, from that wait; otherwise from its serve loop, without pause while
a check runs (peers' reads of its buffer need it) and every millisecond after.
UCX writes its log through a buffered ``FILE*``, hence the ``fflush(NULL)``
before reading it.

Imported by the built-in engine core only, and only with ``--transfer``.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

from .vllm import wire

INSTALL_HINT = (
    "install NIXL on every host, in the interpreter that runs launcher: on CPU hosts without torch, "
    "'pip install numpy && pip install --no-deps nixl-cu12==1.5.1 nixl==1.5.1' (scripts/install-nixl-cpu.sh); "
    "on GPU hosts \"pip install 'launcher[nixl]'\""
)
_READ_TABLE = re.compile(r"\|\s*remote memory read by ")
_ERROR = re.compile(r"UCX\s+ERROR\s+(.*)$")
_TABLE_ROW = re.compile(r"\|\s*[\d.]+\.\.\S*\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|")


class NixlMissing(RuntimeError):
    """NIXL, or what GPU memory needs, cannot be used here; the message says what to install."""


MEMORY_KINDS = ("host", "gpu", "auto")
GPU_TAG = "launcher-transfer-vram"  # in the metadata's attn_backend_name: the peer's buffer is in GPU memory
HOST_TAG = "launcher-transfer"


def pattern(rank: int, nbytes: int):
    """The bytes rank ``rank`` serves: different for every rank, so a read that reached the wrong peer shows."""
    import numpy as np

    return ((np.arange(nbytes, dtype=np.uint64) * 131 + rank * 7919) % 251).astype(np.uint8)


class HostBuffers:
    """The served buffer and the scratch buffer in DRAM (numpy)."""

    kind = "DRAM"
    device = 0

    def __init__(self, rank: int, nbytes: int):
        import numpy as np

        self.served, self.scratch = pattern(rank, nbytes), np.zeros(nbytes, dtype=np.uint8)
        self.served_ptr, self.scratch_ptr = self.served.ctypes.data, self.scratch.ctypes.data

    def clear(self, n: int) -> None:
        self.scratch[:n] = 0

    def holds(self, peer_rank: int, n: int) -> bool:
        return bool((self.scratch[:n] == pattern(peer_rank, n)).all())


class GpuBuffers:
    """The served buffer and the scratch buffer in the rank's own CUDA device (its CUDA_VISIBLE_DEVICES slice),
    where vLLM's NixlConnector registers the KV cache: made and checked on the device with torch, else cupy."""

    kind = "VRAM"

    def __init__(self, rank: int, nbytes: int, library: str, module):
        self.library, self.lib = library, module
        if library == "torch":
            self.device = module.cuda.current_device()
            self.served = self._pattern(rank, nbytes)
            self.scratch = module.zeros(nbytes, dtype=module.uint8, device="cuda")
            self.served_ptr, self.scratch_ptr = self.served.data_ptr(), self.scratch.data_ptr()
        else:
            self.device = module.cuda.Device().id
            self.served = self._pattern(rank, nbytes)
            self.scratch = module.zeros(nbytes, dtype=module.uint8)
            self.served_ptr, self.scratch_ptr = self.served.data.ptr, self.scratch.data.ptr
        self._expected: dict[tuple[int, int], object] = {}
        self._synchronize()

    def _pattern(self, rank: int, n: int):
        lib = self.lib
        if self.library == "torch":
            return ((lib.arange(n, dtype=lib.int64, device="cuda") * 131 + rank * 7919) % 251).to(lib.uint8)
        return ((lib.arange(n, dtype=lib.uint64) * 131 + rank * 7919) % 251).astype(lib.uint8)

    def _synchronize(self) -> None:
        (self.lib.cuda.synchronize if self.library == "torch" else self.lib.cuda.Device().synchronize)()

    def clear(self, n: int) -> None:
        (self.scratch[:n].zero_() if self.library == "torch" else self.scratch[:n].fill(0))
        self._synchronize()  # NIXL writes the scratch buffer outside this stream: the zeros must be there first

    def holds(self, peer_rank: int, n: int) -> bool:
        expected = self._expected.get((peer_rank, n))
        if expected is None:
            expected = self._expected[(peer_rank, n)] = self._pattern(peer_rank, n)
        if self.library == "torch":
            return bool(self.lib.equal(self.scratch[:n], expected))
        return bool((self.scratch[:n] == expected).all())


def cuda_library():
    """('torch' or 'cupy', the module) that reaches a CUDA device here, or (None, why not)."""
    reasons = []
    try:
        import torch

        if torch.cuda.is_available():
            return "torch", torch
        reasons.append(f"torch {torch.__version__} sees no CUDA device")
    except ImportError:
        reasons.append("torch is not installed")
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return "cupy", cupy
        reasons.append("cupy sees no CUDA device")
    except ImportError:
        reasons.append("cupy is not installed")
    except Exception as exc:  # cupy raises its CUDA runtime's errors when there is no driver
        reasons.append(f"cupy: {type(exc).__name__}: {exc}")
    return None, "; ".join(reasons)


def choose_memory(requested: str, env) -> tuple[str, str]:
    """(``host`` or ``gpu``, why) for ``--transfer-memory``: auto is gpu when the rank has a CUDA device and a
    CUDA array library; gpu without one is a NixlMissing naming what to install."""
    if requested == "host":
        return "host", "--transfer-memory host"
    if requested == "auto" and env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "host", "auto: this rank has no CUDA device (CUDA_VISIBLE_DEVICES is empty)"
    library, why = cuda_library()
    if library is None:
        if requested == "gpu":
            raise NixlMissing(
                f"--transfer-memory gpu needs a CUDA device and torch or cupy in the interpreter that runs launcher ({why}); "
                f"install torch (or 'pip install cupy-cuda12x'), or use --transfer-memory host"
            )
        return "host", f"auto: {why}"
    return "gpu", f"{library} on CUDA device {os.environ.get('CUDA_VISIBLE_DEVICES', '0')}"


class TransferEndpoint:
    """This rank's NIXL agent, its served buffer and its scratch buffer for reads."""

    def __init__(self, engine_id: str, rank: int, nbytes: int, interface: str | None, env=os.environ, memory: str = "host"):
        self.memory, self.memory_reason = choose_memory(memory, env)
        # GPU memory over TCP needs cuda_copy to stage it; cuda_ipc moves it GPU to GPU on one host.
        env.setdefault("UCX_TLS", "tcp" if self.memory == "host" else "tcp,cuda_copy,cuda_ipc")
        if interface:
            env.setdefault("UCX_NET_DEVICES", interface)
        env.setdefault("UCX_PROTO_INFO", "y")  # UCX logs which protocol and device each operation uses...
        self.log = UcxLog.for_this_process(env)
        self.vetter = MetadataVetter(env)  # starts now: its NIXL agent's start overlaps this one's
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except ImportError as exc:
            raise NixlMissing(f"NIXL is not installed here ({exc}); {INSTALL_HINT}") from None
        self.rank, self.nbytes, self.engine_id = rank, nbytes, engine_id
        self.agent = nixl_agent(f"launcher-{engine_id}", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        if "UCX" not in self.agent.backends:
            raise NixlMissing(f"NIXL has no UCX backend here (plugins: {', '.join(self.agent.plugin_list) or 'none'}); {INSTALL_HINT}")
        self.buffers = HostBuffers(rank, nbytes) if self.memory == "host" else GpuBuffers(rank, nbytes, *cuda_library())
        b = self.buffers
        for ptr in (b.served_ptr, b.scratch_ptr):
            try:
                self.agent.register_memory(self.agent.get_reg_descs([(ptr, nbytes, b.device, "")], b.kind))
            except Exception as exc:  # a NIXL (or UCX) built without CUDA refuses VRAM
                if b.kind == "DRAM":
                    raise
                raise NixlMissing(
                    f"NIXL cannot register GPU memory here ({type(exc).__name__}: {exc}): install a NIXL built with CUDA "
                    f"('pip install nixl-cu12' or nixl-cu13, matching the driver), or use --transfer-memory host"
                ) from None
        self._lock = threading.Lock()  # NIXL's agent is not thread-safe without its listener: one user at a time
        self._remote: dict[str, str] = {}  # engine id -> NIXL's name for the peer's agent
        self._busy_until = 0.0

    def metadata(self) -> wire.NixlAgentMetadata:
        """What peers need to read this rank's buffer, in vLLM's format (one block: the whole buffer)."""
        return wire.NixlAgentMetadata(
            engine_id=self.engine_id,
            agent_metadata=self.agent.get_agent_metadata(),
            kv_caches_base_addr=[self.buffers.served_ptr],
            device_id=self.buffers.device,
            num_blocks=1,
            block_lens=[self.nbytes],
            block_strides=[self.nbytes],
            kv_cache_layout="HND",
            block_size=16,
            ssm_sizes=(0, 0),
            attn_backend_name=GPU_TAG if self.buffers.kind == "VRAM" else HOST_TAG,
            physical_blocks_per_logical_kv_block=1,
        )

    def expect_reads(self, seconds: float) -> None:
        """Peers are about to read this rank's buffer: progress without pause for ``seconds``."""
        self._busy_until = time.monotonic() + seconds

    def progress(self) -> int:
        """Let UCX move what peers asked of this rank (over TCP their reads need this side's progress);
        returns the milliseconds until the next call: 0 while a check runs, 1 when idle or while this
        rank's own read progresses the agent (spinning beside it would only fight it for the GIL)."""
        if not self._lock.acquire(blocking=False):
            return 1
        try:
            self.agent.get_new_notifs()
        finally:
            self._lock.release()
        return 0 if time.monotonic() < self._busy_until else 1

    def read(self, peer: wire.NixlAgentMetadata, peer_rank: int, timeout: float) -> tuple[float, float, str]:
        """READ the peer's buffer three times and verify it each time; raises TransferFailed.

        Returns (milliseconds of the first read, which pays for UCX's connection
        as vLLM's first KV pull does; MB/s of the best of two more; what UCX used).
        """
        with self._lock:
            name = self._remote.get(peer.engine_id)
            if name is None:
                refused = self.vetter.vet(peer.agent_metadata, timeout=max(timeout, 10.0))
                if refused:
                    raise TransferFailed(f"cannot add the peer's NIXL agent: {refused}")
                try:
                    name = self._remote[peer.engine_id] = self.agent.add_remote_agent(peer.agent_metadata)
                except Exception as exc:  # NIXL raises its own types for a bad peer
                    raise self._failure(f"cannot add the peer's NIXL agent ({type(exc).__name__})") from None
            if not peer.kv_caches_base_addr or not peer.block_lens:
                raise TransferFailed("the peer advertises no buffer (is it a built-in core with --transfer?)")
            if peer.block_lens[0] < self.nbytes:  # every rank of a job serves --transfer-bytes
                raise TransferFailed(f"the peer serves {peer.block_lens[0]} bytes, not the job's {self.nbytes}")
            n = self.nbytes
            local = self.agent.get_xfer_descs([(self.buffers.scratch_ptr, n, self.buffers.device)], self.buffers.kind)
            kind = "VRAM" if peer.attn_backend_name == GPU_TAG else "DRAM"
            remote = self.agent.get_xfer_descs([(peer.kv_caches_base_addr[0], n, peer.device_id)], kind)
            cold = self._read_once(name, local, remote, n, peer_rank, timeout)
            # The best of two warm reads: one scheduler hiccup on a busy host halves a single read's figure.
            warm = min(self._read_once(name, local, remote, n, peer_rank, timeout) for _ in range(2))
        return cold * 1000, n / warm / 1e6, self.used()

    def _read_once(self, name: str, local, remote, n: int, peer_rank: int, timeout: float) -> float:
        self.buffers.clear(n)
        start = time.perf_counter()
        state, handle = "ERR", None
        try:
            handle = self.agent.initialize_xfer("READ", local, remote, name)
            state = self.agent.transfer(handle)
            while state not in ("DONE", "ERR") and time.perf_counter() - start < timeout:
                state = self.agent.check_xfer_state(handle)  # progresses UCX too
        except Exception as exc:  # nixlBackendError and kin: the peer or the path refused
            raise self._failure(f"NIXL failed reading {n} bytes ({type(exc).__name__}: {exc})") from None
        finally:
            elapsed = time.perf_counter() - start
            if handle is not None:
                try:
                    self.agent.release_xfer_handle(handle)  # NIXL aborts a transfer still in flight
                except Exception:
                    pass
        if state == "ERR":
            raise self._failure(f"UCX reported an error reading {n} bytes")
        if state != "DONE":
            raise self._failure(f"no completion within {timeout:g}s reading {n} bytes")
        if not self.buffers.holds(peer_rank, n):
            raise TransferFailed(f"read {n} bytes that are not rank {peer_rank}'s")
        return elapsed

    def _failure(self, what: str) -> TransferFailed:
        """``what`` failed, with UCX's own account when it logged one (it names the address it could not reach)."""
        error = self.log.take_error()
        if error is None:
            return TransferFailed(f"{what} ({self.used()})")
        devices = os.environ.get("UCX_NET_DEVICES", "all")
        return TransferFailed(
            f"{what}: UCX: {error}; UCX_NET_DEVICES (here {devices}) must name an interface on a network both hosts share"
        )

    def used(self) -> str:
        """What UCX chose for remote reads ('software emulation tcp/eth0'), the last it logged; for GPU memory,
        marked when the bytes went through host memory (no cuda_ipc, no GPUDirect RDMA lane)."""
        self.log.update()
        used = self.log.used
        if self.buffers.kind == "VRAM" and staged(used):
            return f"{used} [GPU memory staged through host memory]"
        return used

    def close(self) -> None:
        self.vetter.close()
        self.log.remove()


def staged(used: str) -> bool:
    """Whether UCX's lanes for a read of GPU memory ('zero-copy cuda_ipc/cuda', 'copy-in tcp/eth0') went through host
    memory: no cuda_ipc (GPU to GPU on one host) and no RDMA lane that can reach GPU memory directly (rc, dc, ud)."""
    lanes = used.lower()
    return not any(name in lanes for name in ("cuda_ipc", "rc_mlx5", "rc_verbs", "dc_mlx5", "gdr"))


class MetadataVetter:
    """Loads a peer's NIXL metadata in a process of its own before this rank's agent does.

    NIXL 1.5.1 checks the sections of a peer's blob but hands UCX the worker
    address inside as it is, and UCX crashed on about 1 in 50 fuzzed blobs
    (a cut address with bytes after it): the rank died with it, and the check
    with the rank. A blob that crashes the vetter fails one pair, naming the
    signal; the next blob gets a fresh vetter. Loading is deterministic in
    the blob, so one that loads there loads here.
    """

    def __init__(self, env):
        # Its own UCX logs to its stderr (discarded), not into this rank's log, which reports this rank's reads.
        self._env = {k: v for k, v in env.items() if k != "UCX_LOG_FILE"}
        self._proc: subprocess.Popen | None = None
        self._start()

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.transfer", "--vet"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self._env,
        )

    def vet(self, blob: bytes, timeout: float) -> str | None:
        """None when loading ``blob`` is safe: a NIXL agent loaded it or refused it with an exception (the
        rank's own agent then refuses it too, and its UCX log says why); else why not (the signal that ended
        the vetter, or its silence)."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        proc = self._proc
        try:
            proc.stdin.write(len(blob).to_bytes(8, "little") + blob)
            proc.stdin.flush()
        except OSError:
            pass  # it died: its exit below says how
        ready = select.select([proc.stdout], [], [], timeout)[0]
        answer = proc.stdout.readline() if ready else b""
        if answer.startswith((b"ok", b"error ")):
            return None
        proc.kill()
        code = proc.wait()
        self._proc = None
        if not ready:
            return f"loading it did not finish within {timeout:g}s"
        try:
            how = signal.Signals(-code).name if code < 0 else f"exit {code}"
        except ValueError:
            how = f"exit {code}"
        return f"loading it crashed a NIXL agent ({how}): the peer's metadata is malformed"

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def _vet_forever() -> int:
    """The vetter's side: each blob on stdin (8-byte length, then the bytes) loaded and removed again."""
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # NIXL logs to stdout: only answers may reach the rank
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(f"launcher-vetter-{os.getpid()}", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    while len(head := stdin.read(8)) == 8:
        blob = stdin.read(int.from_bytes(head, "little"))
        try:
            agent.remove_remote_agent(agent.add_remote_agent(blob))
            stdout.write(b"ok\n")
        except Exception as exc:  # NIXL's own types for a blob it refuses
            stdout.write(f"error {type(exc).__name__}\n".encode())
        stdout.flush()
    os._exit(0)  # NIXL 1.5.1 may crash in its destructors at exit; nothing is left to say


if __name__ == "__main__" and sys.argv[1:] == ["--vet"]:
    sys.exit(_vet_forever())


class UcxLog:
    """UCX's own log of this process (UCX_LOG_FILE, with UCX_PROTO_INFO=y): which protocol and device each
    kind of operation uses, and UCX's errors, which name what it could not reach ('no route to 198.19.0.11:4753')."""

    def __init__(self, path: str, private_dir: str | None = None):
        self.path, self.private_dir = path, private_dir
        self.used = "UCX (its log did not say which lane)"
        self.errors: list[str] = []
        self._offset = 0

    @classmethod
    def for_this_process(cls, env) -> UcxLog:
        """The user's UCX_LOG_FILE if set (theirs to keep), else a file in a directory of our own (0700, a
        name nobody can guess): a predictable name in /tmp let another user plant a symlink there, and
        UCX, writing its log, overwrote the file it pointed to."""
        if "UCX_LOG_FILE" in env:
            return cls(env["UCX_LOG_FILE"].replace("%p", str(os.getpid())))
        private = tempfile.mkdtemp(prefix="launcher-ucx-")
        env["UCX_LOG_FILE"] = os.path.join(private, "ucx.log")
        return cls(env["UCX_LOG_FILE"], private)

    def update(self) -> None:
        lines = self._new_lines()
        for i, line in enumerate(lines):
            if _READ_TABLE.search(line):
                rows = [m.groups() for m in map(_TABLE_ROW.search, lines[i + 1 : i + 8]) if m]
                if rows:
                    self.used = ", ".join(sorted({f"{how} {where}" for how, where in rows}))
            elif m := _ERROR.search(line):
                self.errors.append(m.group(1).replace("<no debug data>: ", ""))

    def take_error(self) -> str | None:
        """UCX's last error since the last call, if it logged one."""
        self.update()
        error = self.errors[-1] if self.errors else None
        self.errors.clear()
        return error

    def _new_lines(self) -> list[str]:
        _flush_c_streams()  # UCX writes through a buffered FILE*: what it just chose may still sit in it
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # exactly this file: never a link, never a FIFO
        except OSError:
            return []
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return []
            f.seek(self._offset)
            data = f.read(1 << 20)
        whole = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        self._offset += len(whole)
        return whole.decode(errors="replace").splitlines()

    def remove(self) -> None:
        if self.private_dir is None:
            return  # a log the user asked for (UCX_LOG_FILE) is theirs to keep
        shutil.rmtree(self.private_dir, ignore_errors=True)


def _flush_c_streams() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)  # fflush(NULL): every open output stream of this process
    except (OSError, AttributeError):
        pass


class TransferFailed(Exception):
    """A read that did not move and verify the peer's bytes; str() is the reason."""
