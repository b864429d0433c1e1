"""Data benchmark: peak memory of the sources read per batch at 1k and 100k images, and the cache's speed-up.

    python examples/data_bench.py [--work /tmp/fewstep-data-bench] [--sizes 1000 100000] [--read 2048]

1. Memory. Generates the largest size of tiny 8x8 RGB PNGs (with captions) once under --work (never in
   the repository), then writes each source kind at each size: an imagefolder with metadata.jsonl, a
   ``datasets`` save_to_disk folder (PNG bytes in an Image column) and webdataset shards of 1000 samples.
   For every (kind, size) a fresh subprocess opens the source and reads --read images through the training
   stream (fewstep.data.DataStream, batches of 64, decoding, resizing, flips); it reports its peak resident
   memory (ru_maxrss) and, at the end, its anonymous and file-backed parts. Flat means the 100k peak is
   within 10 % of the 1k peak.
2. Cache. On the tiny SD-style teacher of examples/make_tiny_text_teacher.py (32x32 RGB, 512 captioned
   images): images/s of live preprocessing + VAE + text encoding against reading the memory-mapped cache,
   for the same batches, plus the one-off cache build time.

Prints one JSON object; docs/DATA.md quotes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("metadata", "datasets", "shards")


def make_pngs(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "done").is_file() and int((folder / "done").read_text()) >= n:
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    (folder / "done").write_text(str(n))


def caption(i: int) -> str:
    return f"tiny image number {i} of the benchmark"


def make_source(kind: str, pngs: Path, out: Path, n: int) -> str:
    """Write source ``kind`` with the first ``n`` images; returns data.source."""
    if kind == "metadata":
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metadata.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"file_name": str(pngs / f"{i:06d}.png"), "text": caption(i)}) + "\n")
        return str(out)
    if kind == "datasets":
        import datasets

        if not (out / "state.json").is_file():
            def rows():
                for i in range(n):
                    yield {"image": {"bytes": (pngs / f"{i:06d}.png").read_bytes(), "path": None}, "text": caption(i)}
            features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
            datasets.Dataset.from_generator(rows, features=features, cache_dir=str(out.parent / "hf-cache"))\
                .save_to_disk(str(out))
        return str(out)
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    shards = (n + 999) // 1000
    if not (out / f"{shards - 1:05d}.tar").is_file():
        for s in range(shards):
            with wds.TarWriter(str(out / f"{s:05d}.tar")) as w:
                for i in range(s * 1000, min(n, (s + 1) * 1000)):
                    w.write({"__key__": f"{i:06d}", "png": (pngs / f"{i:06d}.png").read_bytes(), "txt": caption(i)})
    return str(out / f"{{00000..{shards - 1:05d}}}.tar")


def measure(source: str, read: int, cache_root: str) -> dict:
    """Runs in a fresh subprocess: open the source, read ``read`` images through the stream."""
    import resource

    from fewstep.data import DataConfig, DataStream, build_data

    t0 = time.perf_counter()
    cfg = DataConfig(source=source, resolution=8, channels=3, flip=True)
    ds = build_data(cfg, cache_root=Path(cache_root))
    opened = time.perf_counter() - t0
    stream = DataStream(ds, cfg, seed=0, group=64)
    t0 = time.perf_counter()
    for start in range(0, read, 64):
        s = stream.read(start, 64, 0, 64)
        assert s.x.shape == (64, 3, 8, 8) and len(s.prompts) == 64
    out = {"samples": len(ds), "open_s": round(opened, 2), "images_per_s": round(read / (time.perf_counter() - t0)),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    # Where the resident memory is at the end (Linux): anonymous (heap) vs file-backed (libraries, and the pages
    # of memory-mapped data files that were touched: page cache, shared and evictable, not a copy of the data).
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(("RssAnon", "RssFile")):
                out[line.split(":")[0].lower().replace("rss", "rss_") + "_mb"] = round(int(line.split()[1]) / 1024, 1)
    return out


def memory(work: Path, sizes: list[int], read: int) -> dict:
    pngs = work / "png"
    print(f"generating {max(sizes)} PNGs in {pngs} ...", file=sys.stderr)
    make_pngs(pngs, max(sizes))
    out: dict = {}
    for kind in KINDS:
        out[kind] = {}
        for n in sizes:
            source = make_source(kind, pngs, work / f"{kind}-{n}", n)
            args = f"{source!r}, {read}, {str(work / 'cache')!r}"
            code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"from data_bench import measure; print(json.dumps(measure({args})))")
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            out[kind][n] = json.loads(res.stdout.strip().splitlines()[-1])
            print(kind, n, out[kind][n], file=sys.stderr)
        small, large = out[kind][min(sizes)]["peak_rss_mb"], out[kind][max(sizes)]["peak_rss_mb"]
        out[kind]["growth"] = round(large / small - 1, 3)
    return out


def cache_speedup(work: Path, batches: int = 16, batch: int = 16) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from make_tiny_text_teacher import make_data, make_teacher

    from fewstep.cache import prepare_cache
    from fewstep.data import DataConfig, DataStream, build_data
    from fewstep.teacher import load_teacher

    root = work / "tiny-text"
    if not (root / "teacher" / "model_index.json").is_file():
        make_data(root / "data", 512, 0)
        make_teacher(root / "teacher", 0)
    teacher = load_teacher(root / "teacher")
    cfg = DataConfig(source=str(root / "data"), resolution=32, channels=3, cache=str(work / "tiny-text-cache"))
    live_ds = build_data(cfg)
    live = DataStream(live_ds, cfg, seed=0, group=batch)
    torch.manual_seed(0)

    def run(step) -> float:
        t0 = time.perf_counter()
        for k in range(batches):
            step(k * batch)
        return batches * batch / (time.perf_counter() - t0)

    def live_step(p: int) -> None:
        s = live.read(p, batch, 0, batch)
        teacher.encode(s.x)
        teacher.encode_prompts(list(s.prompts))

    shutil.rmtree(cfg.cache, ignore_errors=True)  # time a full build
    t0 = time.perf_counter()
    cached_ds = prepare_cache(live_ds, teacher, work / "cache")
    build_s = time.perf_counter() - t0
    cached = DataStream(cached_ds, cfg, seed=0, group=batch)

    def cached_step(p: int) -> None:
        s = cached.read(p, batch, 0, batch)
        s.text.to("cpu", torch.float32)

    with torch.no_grad():
        live_ips, cached_ips = run(live_step), run(cached_step)
    return {"images": len(live_ds), "batch": batch, "build_s": round(build_s, 2), "live_images_per_s": round(live_ips),
            "cached_images_per_s": round(cached_ips), "speedup": round(cached_ips / live_ips, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fewstep-data-bench"), help="scratch folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000], help="data set sizes")
    parser.add_argument("--read", type=int, default=2048, help="images read per measurement")
    parser.add_argument("--skip-memory", action="store_true", help="only the cache speed-up")
    args = parser.parse_args()
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    result = {"read": args.read, "omp_num_threads": torch_threads}
    if not args.skip_memory:
        result["memory"] = memory(args.work, sorted(args.sizes), args.read)
    result["cache"] = cache_speedup(args.work)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
