"""All-reduce (sum) of the TP ranks of one host through POSIX shared memory.

On CPU every TP rank is a process; gloo's all-reduce goes through loopback TCP and costs
~150-450 us even for one decode token. Here the ranks of a group share one segment of
/dev/shm and a call is: copy in, publish, wait, sum.

Segment layout (offsets in bytes; `n` ranks, slots of `slot_bytes`, a multiple of 4096):

    0       magic b"TFSHMAR1", 16-byte token, n, slot_bytes     (written once by rank 0)
    64(1+r) flag[r]: int64, the last call rank r has published  (one cache line per rank)
    4096 + (b * n + r) * slot_bytes    slot[b][r]: rank r's input of its calls with seq % 2 == b

Call number `seq` (1, 2, ... on every rank in the same order, as for any collective):
    1. copy x into slot[seq % 2][rank]
    2. flag[rank] = seq
    3. wait until flag[q] >= seq for every rank q (>=: a faster peer may already be at seq+1)
    4. x = slot[b][0] + slot[b][1] + ... + slot[b][n-1], in rank order on every rank

Reuse invariant (why two buffers and no second barrier): rank r overwrites slot[b][r] at
call seq + 2 only after its wait of call seq + 1 saw every flag >= seq + 1, and a rank
publishes seq + 1 only after it has finished summing call seq. So nobody still reads what
is overwritten; and a peer's write for seq + 1 goes to the other buffer.

Sums: x = ((slot_0 + slot_1) + slot_2) + ..., adds in the tensor's dtype, in rank order.
A bf16/fp16 add computes in float32 and rounds to the dtype (torch's CPU kernel), so each
of the n - 1 adds rounds once, as gloo's and NCCL's pairwise reductions do: with 2 ranks
the result is bit-identical to gloo's, with more the error bound is the same,
(n - 1) u sum_i |x_i| (u = 2^-8 for bf16). Accumulating in a float32 buffer and rounding
once was measured too: no faster with 2 ranks, and 2-3x slower at 512 x 576 with 3-4 ranks
(the mixed-dtype kernels), for accuracy beyond what gloo gives. Every rank runs the same
ops on the same bytes in the same order, so all get bit-identical results, as TP needs.

Memory ordering: only x86-64 Linux is accepted (`host_key` is None elsewhere; the caller
keeps gloo). x86 is TSO: a core's stores become visible in program order and loads are not
reordered with older loads. The slot copy (torch's kernel; glibc's non-temporal memcpy ends
with sfence; intra-op worker threads are joined through locked instructions, and x86 is
causal) comes before the flag store in program order, and the compiler cannot move stores
across the separately compiled CPython/torch calls between them. A reader sees the flag,
then loads the slots, so it sees the data. The reuse invariant also needs a rank's loads of
call seq's slots to complete before its flag store of seq + 1 is seen: x86 does not
reorder a store with older loads. A weakly ordered CPU (ARM) would need fences that
Python cannot issue cheaply, hence the refusal.
"""

import logging
import mmap
import os
import platform
import secrets
import sys
import time

import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"
PREFIX = "tensorfleet-ar-"
DEFAULT_MAX_BYTES = 2 << 20  # 512 tokens x hidden 1024 in float32; larger falls back to gloo
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAGIC = b"TFSHMAR1"
_HEADER = 4096
_FLAG_STRIDE = 8  # in int64s: one 64-byte cache line per rank's flag

logger = logging.getLogger("tensorfleet.comm")


class AllReduceTimeout(TimeoutError):
    """A peer did not publish within the deadline: it died, hangs, or skipped a call."""


def host_key() -> str | None:
    """Ranks whose keys are equal share a kernel and a /dev/shm mount (a container's own
    tmpfs has its own device number); None where this path is not supported."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        return f"{boot_id}:{os.stat(SHM_DIR).st_dev}"
    except OSError:
        return None


class ShmAllReduce:
    """One rank's view of a group's segment; `all_reduce_(x)` sums x over the group in place.

    Build it with `create` (rank 0) and `attach` (the others), or `open_shm_all_reduce` over
    a gloo group. `timeout_s` bounds every wait.

    Waiting: poll the flags `spin_polls` times (~0.15 us a poll), then `os.sched_yield()`
    between polls, with a deadline. Measured on 2 cores, 7 interleaved rounds (medians):
    with tp=2 every variant gives ~6 us for [1, 576] float32, but in a decode token
    (60 all-reduces between matmuls) a 64-poll spin took 1.24 ms against 1.68 ms yielding
    at once, 1.39 ms spinning 1024 polls and 1.78 ms (p90 5.2 ms) spinning without end;
    with 3 or 4 ranks on the 2 cores a spinning rank takes the core its peer needs
    (1024 polls: 4x slower, an endless spin several ms a call), and yielding at once is
    best (tp=4 token: 4.9 ms; 64 polls 5.5 ms); `time.sleep(10e-6)` after 100 yields was
    no better (its timer slack alone is ~80 us). Hence the default: 64 polls when each
    rank of the group can have a core of its own, else 0.
    """

    def __init__(self, name: str, mapping: mmap.mmap, rank: int, size: int, slot_bytes: int,
                 timeout_s: float, spin_polls: int | None = None):
        if not (0 <= rank < size and 2 <= size <= _HEADER // 64 - 1):
            raise ValueError(f"rank {rank} of a group of {size}: need 0 <= rank < size, 2 <= size <= 63")
        self.name, self.rank, self.size, self.slot_bytes = name, rank, size, slot_bytes
        self.timeout_s = timeout_s
        self.spin_polls = spin_polls if spin_polls is not None else (64 if size <= len(os.sched_getaffinity(0)) else 0)
        self.seq = 0  # calls completed; also the count the tests and benchmarks read
        self._mapping = mapping
        self._flags = memoryview(mapping)[:_HEADER].cast("q")
        self._my_flag = _FLAG_STRIDE * (1 + rank)
        self._peer_flags = [_FLAG_STRIDE * (1 + q) for q in range(size) if q != rank]
        self._bytes = torch.frombuffer(mapping, dtype=torch.uint8)
        self._views: dict[tuple, tuple] = {}  # (dtype, shape) -> per buffer: (my slot, all slots)
        self._broken: str | None = None

    # -- set-up --------------------------------------------------------------------------

    @staticmethod
    def segment_bytes(size: int, max_bytes: int) -> int:
        return _HEADER + 2 * size * _round_up(max_bytes, 4096)

    @classmethod
    def create(cls, size: int, max_bytes: int, timeout_s: float, **kw) -> "ShmAllReduce":
        """Rank 0: make a fresh segment (unique name; space reserved now, so a full /dev/shm is
        an OSError here rather than a SIGBUS on first write)."""
        _sweep_stale()
        slot_bytes = _round_up(max_bytes, 4096)
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            nbytes = cls.segment_bytes(size, max_bytes)
            os.posix_fallocate(fd, 0, nbytes)
            mapping = mmap.mmap(fd, nbytes)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        mapping[:8] = _MAGIC
        mapping[8:24] = secrets.token_bytes(16)
        mapping[24:40] = size.to_bytes(8, "little") + slot_bytes.to_bytes(8, "little")
        return cls(name, mapping, 0, size, slot_bytes, timeout_s, **kw)

    @classmethod
    def attach(cls, name: str, rank: int, size: int, timeout_s: float, **kw) -> "ShmAllReduce":
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        got_size = int.from_bytes(mapping[24:32], "little")
        if mapping[:8] != _MAGIC or got_size != size:
            mapping.close()
            raise RuntimeError(f"{SHM_DIR}/{name} is not a {size}-rank all-reduce segment")
        return cls(name, mapping, rank, size, int.from_bytes(mapping[32:40], "little"), timeout_s, **kw)

    def token(self) -> bytes:
        """Random bytes rank 0 wrote: equal on every rank iff all mapped the same segment."""
        return bytes(self._mapping[8:24])

    def unlink(self) -> None:
        """Remove the name (rank 0, once every rank attached); the mappings stay valid."""
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Detach (and unlink the name if it is still there). Later calls raise."""
        if self.rank == 0:
            self.unlink()
        self._broken = self._broken or "closed"
        self._views.clear()
        self._bytes = None
        self._flags.release()
        try:
            self._mapping.close()
        except BufferError:  # a view escaped somewhere; the mapping goes with the process
            pass

    # -- the collective ------------------------------------------------------------------

    def fits(self, x: torch.Tensor) -> bool:
        """Whether x can go through the segment. It depends only on device, dtype and size,
        which every rank of a collective shares, so all ranks take the same path."""
        return x.device.type == "cpu" and x.dtype in DTYPES and x.numel() * x.element_size() <= self.slot_bytes

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """x <- sum over the group's ranks of x (in place; every rank calls with the same
        shape and dtype, in the same order). The caller checked `fits(x)`."""
        if self._broken:
            raise RuntimeError(f"shared-memory all-reduce unusable: {self._broken}")
        seq = self.seq + 1
        mine, slots = self._views_for(x)[seq & 1]
        mine.copy_(x)
        self._flags[self._my_flag] = seq  # after the data: see "Memory ordering" above
        self._wait(seq)
        torch.add(slots[0], slots[1], out=x)
        for s in slots[2:]:
            x.add_(s)
        self.seq = seq
        return x

    def _wait(self, seq: int) -> None:
        flags, peers = self._flags, self._peer_flags
        polls, deadline = 0, None
        while True:
            for i in peers:
                if flags[i] < seq:
                    break
            else:
                return
            polls += 1
            if polls > self.spin_polls:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.timeout_s
                elif now > deadline:
                    self._fail(seq)
                os.sched_yield()

    def _fail(self, seq: int) -> None:
        missing = [q for q in range(self.size) if self._flags[_FLAG_STRIDE * (1 + q)] < seq]
        self._broken = f"ranks {missing} missed call {seq}"
        raise AllReduceTimeout(
            f"shared-memory all-reduce call {seq}: TP rank(s) {missing} of {self.size} did not "
            f"arrive within {self.timeout_s:g} s (waiting: rank {self.rank}, pid {os.getpid()}). "
            f"The peer died, hangs, or skipped a collective; check its log."
        )

    def _views_for(self, x: torch.Tensor) -> tuple:
        key = (x.dtype, x.shape)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= 256:  # prefill shapes vary; keep the cache bounded
                self._views.clear()
            views = tuple(self._make_views(x, b) for b in (0, 1))
            self._views[key] = views
        return views

    def _make_views(self, x: torch.Tensor, buffer: int) -> tuple:
        nbytes = x.numel() * x.element_size()
        if not self.fits(x):  # checked once per (dtype, shape): a call that skipped fits()
            raise ValueError(f"{x.dtype} tensor of {nbytes} bytes on {x.device} does not fit the "
                             f"{self.slot_bytes}-byte slots ({', '.join(map(str, DTYPES))}); use gloo")
        slots = []
        for r in range(self.size):
            start = _HEADER + (buffer * self.size + r) * self.slot_bytes
            slots.append(self._bytes[start:start + nbytes].view(x.dtype).view(x.shape))
        return slots[self.rank], slots


def open_shm_all_reduce(
    group: dist.ProcessGroup, rank: int, size: int, *, max_bytes: int = DEFAULT_MAX_BYTES, timeout_s: float = 60.0
) -> ShmAllReduce | None:
    """Collective over the (gloo) `group`: this rank's ShmAllReduce, or None on every rank
    alike when the ranks do not share a host or any of them could not map the segment.

    1. all-gather `host_key()`; any None or mismatch -> None (no segment is made)
    2. rank 0 creates the segment and broadcasts its name (None if creation failed)
    3. the others attach; all-gather the token each one read from the header
    4. rank 0 unlinks the name: from here on a crash leaves nothing in /dev/shm
    5. equal tokens everywhere -> use it; else everyone closes and keeps gloo
    """
    keys: list[str | None] = [None] * size
    dist.all_gather_object(keys, host_key(), group=group)
    if keys[0] is None or len(set(keys)) != 1:
        logger.info("TP ranks do not share a host (or not x86-64 Linux): all-reduce over gloo")
        return None
    shm: ShmAllReduce | None = None
    try:
        if rank == 0:
            try:
                shm = ShmAllReduce.create(size, max_bytes, timeout_s)
            except OSError as e:
                logger.warning("cannot create a %d-byte segment in %s (%s): all-reduce over gloo",
                               ShmAllReduce.segment_bytes(size, max_bytes), SHM_DIR, e)
        name = [shm.name if shm else None]
        dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0), group=group)
        if name[0] is None:
            return None
        if rank != 0:
            try:
                shm = ShmAllReduce.attach(name[0], rank, size, timeout_s)
            except (OSError, RuntimeError) as e:
                logger.warning("TP rank %d cannot map %s/%s (%s): all-reduce over gloo", rank, SHM_DIR, name[0], e)
        tokens: list[bytes | None] = [None] * size
        dist.all_gather_object(tokens, shm.token() if shm else None, group=group)
    finally:
        if rank == 0 and shm is not None:
            shm.unlink()
    if tokens[0] is None or len(set(tokens)) != 1:
        if shm is not None:
            shm.close()
        return None
    return shm


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _sweep_stale(min_age_s: float = 600.0) -> None:
    """Unlink segments a killed rank 0 left behind between create and unlink: their creator
    is gone and they are older than any set-up (a name only lives during set-up)."""
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX)]
    except OSError:
        return
    for n in names:
        path = os.path.join(SHM_DIR, n)
        try:
            pid = int(n[len(PREFIX):].split("-")[0])
            if time.time() - os.stat(path).st_mtime < min_age_s or _alive(pid):
                continue
            os.unlink(path)
        except (ValueError, OSError):
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return True
