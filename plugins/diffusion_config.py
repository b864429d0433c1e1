"""Configs of the ``diffusion`` method and their pure-config hooks, import-light (pydantic and
fewstep's config modules only) so that plugin discovery and ``fewstep validate`` read them without torch;
:mod:`fewstep_plugins.diffusion` (the training hooks) re-exports them. docs/PLUGINS.md "Config modules".
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from fewstep.config import MethodConfig
from fewstep.hookspecs import hookimpl


class BackboneSpec(BaseModel):
    """Architecture of a teacher trained from scratch (ignored when teacher.pretrained is given)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["unet", "dit"] = Field("unet", description="diffusers UNet2DModel or DiTTransformer2DModel.")
    block_out_channels: list[int] = Field([32, 64, 64], min_length=1, description="UNet channels per level.")
    layers_per_block: int = Field(1, ge=1, description="UNet residual blocks per level.")
    attention_levels: list[int] = Field([2], description="UNet levels (0-based) with self-attention.")
    norm_num_groups: int = Field(8, ge=1, description="GroupNorm groups (must divide every channel count).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="UNet dropout.")
    num_layers: int = Field(4, ge=1, description="DiT blocks.")
    num_attention_heads: int = Field(4, ge=1, description="DiT heads.")
    attention_head_dim: int = Field(16, ge=1, description="DiT head width.")
    patch_size: int = Field(2, ge=1, description="DiT patch size.")
    num_classes: int | None = Field(None, ge=1, description="Class-conditional with this many classes (a null "
                                    "class is added for classifier-free guidance); none: unconditional.")


class ProcessSpec(BaseModel):
    """Noise process of a teacher trained from scratch (ignored when teacher.pretrained is given)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["vp", "edm", "flow"] = Field("vp", description="VP/DDPM, EDM, or flow matching.")
    prediction_type: Literal["epsilon", "v_prediction", "sample", "flow"] | None = Field(
        None, description="Network output; none: v_prediction for vp, epsilon (EDM-preconditioned) for edm, "
        "flow (velocity) for flow.")
    num_train_timesteps: int = Field(1000, ge=2, description="Discrete timesteps (DDPM: 1000).")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field("linear", description="VP betas.")
    beta_start: float = Field(0.0001, gt=0, description="VP beta_1 (DDPM: 1e-4).")
    beta_end: float = Field(0.02, gt=0, description="VP beta_T (DDPM: 0.02).")
    sigma_min: float = Field(0.002, gt=0, description="EDM sigma_min (EDM: 0.002).")
    sigma_max: float = Field(80.0, gt=0, description="EDM sigma_max (EDM: 80).")
    sigma_data: float = Field(0.5, gt=0, description="EDM sigma_data (EDM: 0.5).")
    shift: float = Field(1.0, gt=0, description="Flow-matching time shift (SD3 uses 3.0 at 1024px).")

    def build(self):
        from fewstep.diffusion import EDMProcess, FlowProcess, VPProcess

        if self.kind == "vp":
            return VPProcess(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                             beta_end=self.beta_end, beta_schedule=self.beta_schedule,
                             prediction_type=self.prediction_type or "v_prediction")
        if self.kind == "edm":
            return EDMProcess(sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data,
                              prediction_type=self.prediction_type or "epsilon")
        return FlowProcess(num_train_timesteps=self.num_train_timesteps, shift=self.shift)


class DiffusionConfig(MethodConfig):
    #: the network trained here is a teacher, regressed on its raw output: no student conditioning (CONDITIONING.md)
    conditions_student: ClassVar[bool] = False

    name: Literal["diffusion"] = "diffusion"
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    process: ProcessSpec = Field(default_factory=ProcessSpec)
    p_uncond: float = Field(0.1, ge=0.0, lt=1.0, description="Condition dropout for classifier-free guidance "
                            "(CFG paper: 0.1-0.2); only used by conditional teachers.")
    solver: Literal["euler", "ddim", "heun"] = Field("heun", description="ODE solver of the sampler (EDM: Heun).")
    self_condition: bool = Field(False, description="Self-conditioning (Analog Bits, distribution.md §6): the network "
                                 "also reads its own x0 estimate (zero-initialised extra input channels); half of "
                                 "each batch is trained with a no-grad first-pass estimate (pix2seq's rate 0.5), "
                                 "and the sampler feeds each step the previous step's estimate.")


@hookimpl
def fewstep_method_config():
    return ("diffusion", DiffusionConfig)
