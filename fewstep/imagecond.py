"""Condition images made from the data: a teacher's conditioning transform.

An image-conditioned teacher (a backbone with ``image_channels``, see :mod:`fewstep.backbones`) reads a condition
image next to x in every call, through ``Cond.image``. When it is distilled, its data set holds clean images x0,
not conditions: the teacher folder names how its condition is made from x0 (``"image_condition"`` in
``fewstep_teacher.json``, :class:`ImageCondition`), and the trainer fills ``Cond.image`` of every batch (cond and
uncond alike) before the method's loss runs. A method therefore distils such a teacher unchanged: it calls
``process.denoise(net, x, sigma, batch.cond)`` on teacher and student, and both read the same image.

Transforms (``kind``):

- ``lowres``: c = U_r(D_s(x0)) + noise * z: the data block-averaged to ``size`` (D_s), up-sampled back to the
  data's size r (U_r: nearest or bilinear), plus Gaussian conditioning augmentation (Cascaded Diffusion Models,
  Ho et al. 2022). This is a LowDiff stage's condition (``fewstep.cascade.lowres_condition``, with the noise it is
  trained with) and the degraded input of a super-resolution model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import Tensor

from fewstep.cascade import downsample, upsample
from fewstep.types import Cond

__all__ = ["ImageCondition", "require_image_condition"]


@dataclass(frozen=True)
class ImageCondition:
    """How a teacher's condition image is made from its clean data (module docstring).

    kind: the transform ("lowres"). size: the low resolution the data is block-averaged to (model-space pixels, a
    divisor of the data's size). upsampling: "nearest" or "bilinear", back to the data's size. noise: standard
    deviation of the Gaussian augmentation added to the up-sampled image, data units (0: none).
    """

    kind: Literal["lowres"] = "lowres"
    size: int = 1
    upsampling: Literal["nearest", "bilinear"] = "nearest"
    noise: float = 0.0

    def __post_init__(self) -> None:
        if self.kind != "lowres":
            raise ValueError(f"image_condition kind {self.kind!r} is unknown; fewstep knows 'lowres'")
        if self.size < 1 or self.noise < 0 or self.upsampling not in ("nearest", "bilinear"):
            raise ValueError(f"image_condition {self.config()}: give size >= 1, noise >= 0 and upsampling nearest "
                             "or bilinear")

    def config(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: str = "image_condition") -> ImageCondition:
        unknown = set(cfg) - {"kind", "size", "upsampling", "noise"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; an image condition has kind, size, "
                             "upsampling and noise")
        return cls(**cfg)

    def make(self, x0: Tensor, z: Tensor) -> Tensor:
        """The condition image (B, C, H, W) of clean data x0 (B, C, H, W), with z (B, C, H, W) standard normal."""
        if x0.shape[-1] % self.size or x0.shape[-2] % self.size:
            raise ValueError(f"image_condition: the data is {tuple(x0.shape[-2:])}, not a multiple of the "
                             f"condition's low resolution {self.size}; set data.resolution to the teacher's size")
        low = upsample(downsample(x0.float(), self.size), x0.shape[-1], self.upsampling)
        return (low + self.noise * z.float() if self.noise > 0 else low).to(x0.dtype)

    def attach(self, x0: Tensor | None, cond: Cond, uncond: Cond | None, z: Tensor) -> tuple[Cond, Cond | None]:
        """cond and uncond of a batch with the condition image of x0 (the same image in both: guidance contrasts
        labels or text, never the image)."""
        if x0 is None:
            raise ValueError("the teacher is image-conditioned: its condition image is made from the batch's images "
                             "(image_condition), but this batch has none; give the run a data source with images")
        image = self.make(x0, z)
        return cond.with_image(image), None if uncond is None else uncond.with_image(image)


def require_image_condition(teacher: Any, *, pairs: bool = False) -> ImageCondition:
    """The image condition of an image-conditioned teacher, or a clear error where the data cannot make one."""
    if teacher.image_condition is None:
        raise ValueError(f"teacher {teacher.source} reads a {teacher.net.image_channels}-channel condition image "
                         "(Cond.image) but declares no image_condition in its fewstep_teacher.json, so the trainer "
                         'cannot make it from the data; add e.g. "image_condition": {"kind": "lowres", "size": 8, '
                         '"upsampling": "nearest", "noise": 0.1} (a LowDiff export writes it into stage_teachers/)')
    if pairs:
        raise ValueError(f"teacher {teacher.source} is image-conditioned, and a pair store (data.pairs) holds no "
                         "condition images; distil it without data.pairs")
    return teacher.image_condition
