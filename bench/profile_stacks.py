"""Where a profiled exitplan run spent its CPU: py-spy's raw stacks sorted into the costs the
small-object path is made of (bench_migrate.py --profile), and a small flame graph SVG of them.

py-spy (`pip install py-spy` into the venv) samples every thread that is on a CPU (idle threads
are left out), so the share of samples in a bucket times the run's CPU ms per object is that
bucket's CPU ms per object.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

# Checked from the leaf up: the innermost frame that matches names the cost. Frames read
# "function (path:line)", the path relative to its sys.path entry (azure.storage.blob's files
# show as "blob/...", azure.core's as "core/..."), hence the "(" that anchors each pattern. The order inside one
# frame does not matter (the patterns do not overlap); the leaf-first walk is what makes a SHA-256
# inside botocore's signer count as signing, not as hashing of the object.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("request signing (SigV4, Shared Key)", ("botocore/auth.py", "botocore/signers.py", "(connectors/signing.py",
                                            "(blob/_shared/authentication.py")),
    ("hashing of the object (SHA-256, MD5)", ("(engine/ordered_digest.py",)),
    ("encryption (Tink set-up and segments)", ("(engine/crypto/", "(tink/", "(cryptography/")),
    ("state store (SQLAlchemy, SQLite)", ("(engine/state/", "(sqlalchemy/", "sqlite3/")),
    ("audit manifest", ("(engine/audit.py",)),
    ("HTTP and sockets (libcurl, http.client, urllib3)", ("(connectors/curl.py", "(http/client.py", "(urllib3/",
                                                           "(socket.py", "(ssl.py", "(requests/adapters.py",
                                                           "(email/")),
    ("Azure SDK pipeline (azure.core, azure.storage, requests)",
     ("(azure/", "(core/", "(blob/", "(storage/", "(requests/")),
    ("S3 SDK request building (botocore, boto3)", ("(botocore/", "(boto3/", "(s3transfer/", "(dateutil/")),
    ("thread hand-offs (executors, futures, locks)", ("(threading.py", "(concurrent/futures/", "(queue.py",
                                                       "(engine/executors.py")),
    ("retries (tenacity)", ("(tenacity/",)),
    ("Prefect (task runs, API client, events, logs)", ("(prefect/", "(httpx/", "(httpcore/", "(anyio/",
                                                       "(websockets/", "(h2/")),
    ("imports and start-up", ("(<frozen importlib", "(importlib/")),
    ("logging", ("(logging/",)),
    ("exitplan engine (pipeline, planning, placement)", ("(engine/", "(connectors/")),
    ("CLI, config and everything else", ("",)),
)


def read_raw(path: Path) -> Counter:
    """py-spy's raw (collapsed) format: `frame;frame;... count` per line, root first."""
    stacks: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def bucket_of(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for name, patterns in BUCKETS[:-1]:
            if any(p in frame for p in patterns):
                return name
    return BUCKETS[-1][0]


def breakdown(stacks: Counter) -> dict[str, int]:
    """Samples per bucket, in `BUCKETS` order (empty buckets left out)."""
    out: Counter = Counter()
    for stack, n in stacks.items():
        out[bucket_of(stack)] += n
    return {name: out[name] for name, _ in BUCKETS if out[name]}


def summary_text(title: str, stacks: Counter, cpu_ms_per_object: float | None, top: int = 25) -> str:
    """The breakdown as text lines: samples, share and (given the run's CPU per object) ms per object."""
    total = sum(stacks.values()) or 1
    lines = [title, f"{total} samples" + (f", {cpu_ms_per_object:.2f} CPU ms per object in the run"
                                          if cpu_ms_per_object else ""),
             f"  {'where':52} {'samples':>8} {'share':>6} {'ms/obj':>7}"]
    for name, n in breakdown(stacks).items():
        ms = f"{cpu_ms_per_object * n / total:7.3f}" if cpu_ms_per_object else ""
        lines.append(f"  {name:52} {n:8d} {100 * n / total:5.1f}% {ms}")
    lines.append(f"  top {top} innermost Python frames (self time; C calls count in their caller)")
    leaves: Counter = Counter()
    for stack, n in stacks.items():
        leaves[stack.rsplit(";", 1)[-1]] += n
    for frame, n in leaves.most_common(top):
        ms = f"{cpu_ms_per_object * n / total:7.3f}" if cpu_ms_per_object else ""
        lines.append(f"    {frame[:90]:90} {100 * n / total:5.1f}% {ms}")
    return "\n".join(lines) + "\n"


def flame_svg(stacks: Counter, title: str, width: int = 1200, row: int = 16, min_width: float = 2.0) -> str:
    """A plain flame graph (root at the bottom) of `stacks`; frames narrower than `min_width`
    pixels are left out, hover shows the frame and its share."""
    tree: dict = {}
    for stack, n in stacks.items():
        node = tree
        for frame in stack.split(";"):
            child = node.setdefault(frame, [0, {}])
            child[0] += n
            node = child[1]
    total = sum(stacks.values()) or 1

    def depth(node: dict) -> int:
        return 1 + max((depth(c[1]) for c in node.values()), default=0)

    height = (depth(tree) + 1) * row + 30
    rects: list[str] = []

    def walk(node: dict, x: float, level: int) -> None:
        for frame, (n, children) in sorted(node.items()):
            w = width * n / total
            if w >= min_width:
                y = height - (level + 1) * row
                label = html.escape(frame)
                hue = 20 + (hash(frame.split(" ")[-1]) % 40)
                text = html.escape(frame[: int(w / 7)]) if w > 28 else ""
                rects.append(f'<g><title>{label} ({100 * n / total:.2f}%)</title>'
                             f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" '
                             f'fill="hsl({hue},90%,60%)"/><text x="{x + 2:.1f}" y="{y + row - 4}">{text}</text></g>')
                walk(children, x, level + 1)
            x += w

    walk(tree, 0.0, 0)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="monospace" font-size="11">\n<text x="4" y="16">{html.escape(title)}</text>\n'
            + "\n".join(rects) + "\n</svg>\n")
