#!/usr/bin/env python3
"""Benchmark the Tink segment encryptor: throughput on one and two threads, and CPU added per GB.

Everything in memory, one process, no servers. Over the same bytes (16 MiB parts, the pipeline's
auto part size) it measures:

1. the peer: bare ``AESGCM.encrypt`` on 1 MiB segments with a fixed key and nonces (the ceiling
   for this machine; LAB-NOTES.md quotes about 19 GB/s per core);
2. ``TinkEncoder.encode`` per part (what the pipeline calls) on one thread, and on two threads
   sharing the parts, with the scaling ratio between them;
3. an alternative to the encoder: ``AESGCM.encrypt`` per segment then one ``b"".join`` (the
   design the encoder avoids by encrypting into the part's buffer);
4. CPU seconds per GB added by encryption: the pipeline's per-part work (encode, then MD5 of the
   output for the Content-MD5) with `TinkFormat` minus the same with `IdentityFormat`;
5. the same difference through the whole `copy_object` on the in-memory connectors.

Prints a table; timings are ratios against peers measured in the same run, never test thresholds.
Run with the project's venv: ``.venv/bin/python bench/bench_crypto.py [--gib 1] [--repeat 3]``.

Allocation matters more than AES here: every part's output is a fresh 16 MiB buffer, and glibc
gives worker threads their own arenas, which hand freed memory back to the kernel, so the next
buffer is page-faulted in again (about 0.1 system-CPU s/GB). ``--tuned-malloc`` re-runs the bench
with ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``
(freed part buffers are reused in place) to show the difference.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from connectors.base import ObjectMeta, SinkLimits, WriteMeta  # noqa: E402
from connectors.memory import MemoryStore  # noqa: E402
from engine.budget import MemoryBudget  # noqa: E402
from engine.crypto.datakeys import data_keys, new_keyset  # noqa: E402
from engine.crypto.tink_format import TINK_LAYOUT, TinkFormat  # noqa: E402
from engine.executors import create_executors  # noqa: E402
from engine.placement import Placement  # noqa: E402
from engine.output_format import IDENTITY  # noqa: E402
from engine.pipeline import copy_object  # noqa: E402
from engine.planning import MiB, plan_object  # noqa: E402
from engine.settings import TransferSettings  # noqa: E402

GB = 1e9
PART = 16 * MiB


def measure(fn, repeat: int) -> tuple[float, float]:
    """Best wall seconds and best process CPU seconds (user + system, all threads) of `repeat`
    runs of `fn`, each the minimum on its own: on a shared machine the wall time is the noisier."""
    walls, cpus = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="plaintext per measurement, GiB (default 1)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is kept (default 3)")
    ap.add_argument("--tuned-malloc", action="store_true", help="re-run under the glibc settings described above")
    args = ap.parse_args()
    if args.tuned_malloc and "MALLOC_ARENA_MAX" not in os.environ:
        env = dict(os.environ, MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="33554432",
                   MALLOC_TRIM_THRESHOLD_="1073741824")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    print("malloc:", " ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("MALLOC_")) or "defaults")

    size = int(args.gib * 1024**3)
    data = os.urandom(size)  # generated before any timer
    view = memoryview(data)
    keys = data_keys(new_keyset())
    fmt = TinkFormat(keys, "bench")
    meta = ObjectMeta("bench/object.bin", size, "etag")
    plan = plan_object(size, SinkLimits(), layout=fmt.layout, part_size=PART)
    parts = [(p.first_segment, view[p.plaintext_start:p.plaintext_end]) for p in plan.parts]
    rows: list[tuple[str, float, float]] = []  # (what, GB/s of plaintext, CPU s per GB)

    def row(what: str, wall: float, cpu: float, n: int = size) -> None:
        rows.append((what, n / wall / GB, cpu / (n / GB)))

    load_before = os.getloadavg()[0]

    # 1. The peer: bare AES-GCM on 1 MiB segments.
    aead = AESGCM(os.urandom(32))
    seg_views = [view[i:i + TINK_LAYOUT.segment_plaintext] for i in range(0, size, TINK_LAYOUT.segment_plaintext)]

    def bare():
        nonce = os.urandom(12)
        for s in seg_views:
            aead.encrypt(nonce, s, None)

    row("bare AESGCM.encrypt, 1 MiB, 1 thread", *measure(bare, args.repeat))

    # 2. The encoder, per 16 MiB part, one and two threads (a new attempt each run: fresh header).
    def encode_parts(threads: int):
        def run():
            encoder = fmt.begin(meta)
            if threads == 1:
                for first, pt in parts:
                    encoder.encode(first, pt)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    for _ in pool.map(lambda p: encoder.encode(*p), parts):
                        pass
        return run

    row("TinkEncoder.encode, 16 MiB parts, 1 thread", *measure(encode_parts(1), args.repeat))
    row("TinkEncoder.encode, 16 MiB parts, 2 threads", *measure(encode_parts(2), args.repeat))

    # 2b. Does AES-GCM run on both threads at once (the GIL released)? Two threads encrypt into
    # their own preallocated buffer (no allocation) and record each call's interval; the overlap
    # is the share of the wall time during which both were inside AES-GCM. With the GIL held it
    # would be about 0; on two idle cores it approaches 1; other load on the machine lowers it.
    def overlap_run() -> tuple[float, float]:
        half = len(seg_views) // 2
        intervals: list[list[tuple[float, float]]] = [[], []]
        nonce = os.urandom(12)

        def worker(k: int) -> None:
            buf = memoryview(bytearray(TINK_LAYOUT.segment_plaintext + 16))
            log = intervals[k]
            for s in seg_views[k * half:(k + 1) * half]:
                if len(s) != TINK_LAYOUT.segment_plaintext:
                    continue
                t0 = time.perf_counter()
                aead.encrypt_into(nonce, s, None, buf)
                log.append((t0, time.perf_counter()))

        w0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(worker, (0, 1)))
        wall = time.perf_counter() - w0
        both, j = 0.0, 0
        b = intervals[1]
        for s0, e0 in intervals[0]:
            while j < len(b) and b[j][1] <= s0:
                j += 1
            k = j
            while k < len(b) and b[k][0] < e0:
                both += min(e0, b[k][1]) - max(s0, b[k][0])
                k += 1
        n = sum(len(x) for x in intervals) * TINK_LAYOUT.segment_plaintext
        return both / wall, n / wall / GB

    overlap, pure_two = max(overlap_run() for _ in range(args.repeat))

    # 3. The alternative the encoder avoids: an allocation per segment, then a join per part.
    def encrypt_and_join():
        enc = fmt.begin(meta).encryptor
        last = TINK_LAYOUT.segment_count(size) - 1
        for first, pt in parts:
            out, pos, i = [], 0, first
            while pos < len(pt):
                n = TINK_LAYOUT.segment_plaintext_range(i, size)[1] - TINK_LAYOUT.segment_plaintext_range(i, size)[0]
                out.append(enc.encrypt_segment(i, pt[pos:pos + n], i == last))
                pos += n
                i += 1
            b"".join(out)

    row("encrypt_segment + b''.join, 1 thread", *measure(encrypt_and_join, args.repeat))

    # 4. The pipeline's per-part work, encryption vs identity: encode, then MD5 of the output.
    def per_part(output_format):
        def run():
            encoder = output_format.begin(meta)
            for first, pt in parts:
                hashlib.md5(encoder.encode(first, pt)).digest()
        return run

    id_wall, id_cpu = measure(per_part(IDENTITY), args.repeat)
    tk_wall, tk_cpu = measure(per_part(fmt), args.repeat)
    row("per part: identity encode + MD5", id_wall, id_cpu)
    row("per part: Tink encode + MD5", tk_wall, tk_cpu)

    # 5. The whole copy_object on the in-memory connectors (they copy bytes: a floor, not a cloud).
    copy_size = min(size, 256 * MiB)
    src = MemoryStore(label="src")
    obj = src.add("bench/object.bin", data[:copy_size], content_md5=False)
    settings = TransferSettings(memory_budget=256 * MiB, part_size=PART, concurrency=2)

    def copy(output_format):
        def run():
            dst = MemoryStore(limits=SinkLimits(), label="dst")
            with create_executors(settings.concurrency) as ex:
                out = copy_object(src, dst, obj, Placement(obj.key, obj.key, WriteMeta()), settings=settings,
                                  budget=MemoryBudget(settings.memory_budget), executors=ex,
                                  output_format=output_format)
            assert out.status == "ok", out.reason
        return run

    cid_wall, cid_cpu = measure(copy(IDENTITY), args.repeat)
    ctk_wall, ctk_cpu = measure(copy(fmt), args.repeat)
    row("copy_object in memory, identity (2 threads)", cid_wall, cid_cpu, copy_size)
    row("copy_object in memory, Tink (2 threads)", ctk_wall, ctk_cpu, copy_size)

    print(f"plaintext per measurement: {size / GB:.2f} GB; best of {args.repeat}; {os.cpu_count()} CPUs; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (wall figures need idle CPUs)")
    print(f"{'measurement':48} {'GB/s wall':>10} {'CPU s/GB':>9} {'GB per CPU-s':>13}")
    for what, gbps, cpu_per_gb in rows:
        print(f"{what:48} {gbps:10.2f} {cpu_per_gb:9.3f} {1 / cpu_per_gb:13.2f}")
    one = rows[1][1]
    two = rows[2][1]
    print()
    print(f"encoder vs bare AES-GCM (1 thread):      {one / rows[0][1]:.2f}x")
    print(f"two threads vs one (wall):                {two / one:.2f}x "
          f"(CPU per GB {rows[2][2] / rows[1][2]:.2f}x of one thread's)")
    print(f"encoder vs encrypt+join (1 thread):       {one / rows[3][1]:.2f}x")
    print(f"AES-GCM on 2 threads, no allocation:      {pure_two:.2f} GB/s wall, both threads inside AES-GCM "
          f"{overlap:.0%} of the time")
    print(f"CPU added by encryption, per-part work:   {(tk_cpu - id_cpu) / (size / GB):.3f} CPU s/GB")
    print(f"CPU added by encryption, copy_object:     {(ctk_cpu - cid_cpu) / (copy_size / GB):.3f} CPU s/GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
