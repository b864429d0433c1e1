"""What each loop of the paired benchmark (examples/paired_bench.py) holds at its peak resident memory.

One fresh process per call, one loop (``fewstep``: the digits CD recipe with ``substeps: 1`` through
``fewstep.bench``, as the benchmark builds it; ``hand``: examples/hand_cd_loop.py), ``--steps`` steps.

``--peak`` (default): a thread samples ``/proc/self/status`` (every 0.3 ms, plus glibc's ``mallinfo2``) and keeps
the sample with the highest resident memory of each step, split into file-backed pages (shared libraries),
glibc's heap (in use / free), its mmap'd blocks, the other anonymous memory (Python's object arenas, mostly),
and Python's allocated blocks (``sys.getallocatedblocks``); ``where`` says what the main thread was in
(a network's forward, the backward). ``--trace``: tracemalloc started after importing what the hand loop's
process imports (torch, diffusers, scikit-learn, accelerate), so its total is what the loop adds on top; the
live Python allocations after the steps are grouped by the first repository file on their stack (what fewstep
or the hand loop was doing) and by the package of the innermost frame. Linux only (``/proc``, glibc).

    OMP_NUM_THREADS=1 python examples/paired_memory.py fewstep
    OMP_NUM_THREADS=1 python examples/paired_memory.py hand --trace
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def memory_now(libc: ctypes.CDLL) -> dict[str, float]:
    """MB: resident (VmRSS), file-backed, anonymous; glibc heap in use / free, mmap'd blocks; the anonymous rest."""
    d = {}
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("VmRSS", "RssAnon", "RssFile"):
            d[key] = int(value.split()[0]) / 1024
    m = libc.mallinfo2()
    d.update(heap_used=m.uordblks / 2**20, heap_free=m.fordblks / 2**20, mmap=m.hblkhd / 2**20,
             anon_other=d["RssAnon"] - (m.arena + m.hblkhd) / 2**20, py_kblocks=sys.getallocatedblocks() / 1000)
    return d


def build(loop: str, steps: int):
    """(step function, {name: network}) of one loop, built as examples/paired_bench.py builds it."""
    if loop == "hand":
        sys.path.insert(0, str(ROOT / "examples"))
        from hand_cd_loop import HandCD

        hand = HandCD(guard=True)
        return hand.step, {"teacher": hand.teacher, "student": hand.student}
    from fewstep.bench import bench_trainer, run_step
    from fewstep.config import load_config
    from fewstep.plugin import build_manager, discover

    plugins = discover()
    config = load_config(ROOT / "recipes" / "digits" / "cd.yaml", plugins=plugins)
    config = config.model_copy(update={"method": config.method.model_copy(update={"substeps": 1})})
    pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable, plugins=plugins)
    trainer = bench_trainer(config, pm, Path(tempfile.mkdtemp(prefix="paired-memory-")), steps)
    return (lambda: run_step(trainer)), {"teacher": trainer.nets.teacher.net, "student": trainer.nets.student}


def peak(loop: str, steps: int) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    step, nets = build(loop, steps)
    import torch

    label, calls = ["-"], collections.Counter()
    for name, net in nets.items():
        def pre(*_: object, name: str = name) -> None:
            calls[name] += 1
            label[0] = f"{name} forward {calls[name]}"

        def post(*_: object, name: str = name) -> None:
            label[0] = f"after {name} forward {calls[name]}"

        net.register_forward_pre_hook(pre)
        net.register_forward_hook(post)
    backward = torch.autograd.backward

    def timed_backward(*args: object, **kwargs: object) -> None:
        label[0] = "backward"
        backward(*args, **kwargs)
        label[0] = "after backward"

    torch.autograd.backward = timed_backward  # Tensor.backward calls it
    best: dict[str, float] = {}
    where = ["-"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            d = memory_now(libc)
            if d["VmRSS"] > best.get("VmRSS", 0.0):
                best.clear()
                best.update(d)
                where[0] = label[0]
            time.sleep(0.0003)

    print(json.dumps({"loop": loop, "built": {k: round(v, 1) for k, v in memory_now(libc).items()}}))
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for i in range(steps):
        calls.clear()
        best.clear()
        step()
        time.sleep(0.01)
        print(json.dumps({"step": i, "where": where[0], **{k: round(v, 1) for k, v in best.items()}}), flush=True)
    stop.set()
    thread.join()


def trace(loop: str, steps: int) -> None:
    import tracemalloc

    import accelerate  # noqa: F401 - what the hand loop's process imports, untraced
    import diffusers  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import torch  # noqa: F401

    gc.collect()
    blocks0 = sys.getallocatedblocks()
    tracemalloc.start(40)
    step, _ = build(loop, steps)
    for _ in range(steps):
        step()
    gc.collect()
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()

    def where(filename: str) -> str:
        if "site-packages/" in filename:
            return filename.split("site-packages/")[1].split("/")[0].split(".")[0]
        if filename.startswith(str(ROOT)):
            return "/".join(Path(filename).relative_to(ROOT).parts[:2])
        if "/lib/python3" in filename:
            return "stdlib " + filename.rsplit("/", 1)[1]
        return filename

    outer, inner = collections.Counter(), collections.Counter()
    for tr in snap.traces:
        frames = list(tr.traceback)  # oldest first
        mine = [f.filename for f in frames if f.filename.startswith(str(ROOT)) and f.filename != str(Path(__file__).resolve())]
        outer[where(mine[0]) if mine else "(no repository frame)"] += tr.size
        library = [f.filename for f in frames if "importlib" not in f.filename and not f.filename.startswith("<")]
        inner[where(library[-1]) if library else "(import system)"] += tr.size
    print(json.dumps({"loop": loop, "traced_mb": round(sum(outer.values()) / 2**20, 2),
                      "python_blocks_added_k": round((sys.getallocatedblocks() - blocks0) / 1000, 1)}))
    for title, counter in (("first repository file on the stack", outer), ("innermost package", inner)):
        print(f"# MB by {title}")
        for key, size in counter.most_common(15):
            print(f"{size / 2**20:7.2f}  {key}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loop", choices=("fewstep", "hand"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trace", action="store_true", help="tracemalloc's live Python allocations instead")
    args = parser.parse_args()
    (trace if args.trace else peak)(args.loop, args.steps)


if __name__ == "__main__":
    main()
