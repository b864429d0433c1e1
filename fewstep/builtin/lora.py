"""LoRA exports (fewstep.lora, docs/LORA.md): diffusers' ``pytorch_lora_weights.safetensors`` of the sampling
network's adapter, written next to the full export (whose weights have the adapter fused in, by
``LoraBackbone.save_pretrained``) or alone with ``lora.export: adapter``. Inactive without a ``lora`` section."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

from fewstep.hookspecs import hookimpl
from fewstep.types import Nets, RunContext


@hookimpl(tryfirst=True, specname="fewstep_export")
def export_adapter_only(ctx: RunContext, nets: Nets, out_dir: Path, stock: Any, reason: str) -> Path | None:
    """``lora.export: adapter``: only the LoRA file, for the teacher's stock pipeline's ``load_lora_weights``;
    refused where that pipeline with the adapter is not the student (``fewstep.lora.require_adapter_export``)."""
    lora = getattr(ctx.config, "lora", None)
    if lora is None or lora.export != "adapter":
        return None
    from fewstep.lora import export_lora, require_adapter_export

    require_adapter_export(ctx.method.name, stock, reason)
    return export_lora(ctx, nets, Path(out_dir))


@hookimpl(wrapper=True, specname="fewstep_export")
def export_adapter_too(ctx: RunContext, nets: Nets, out_dir: Path) -> Generator[None, Path | None, Path | None]:
    """``lora.export: both``: the LoRA file inside the folder the export wrote."""
    result = yield
    lora = getattr(ctx.config, "lora", None)
    if lora is not None and lora.export == "both" and result is not None:
        from fewstep.lora import export_lora

        export_lora(ctx, nets, Path(result))
    return result
