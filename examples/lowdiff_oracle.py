"""Where a LowDiff cascade loses quality: `fewstep eval` with its lowest stages replaced by the truth.

    OMP_NUM_THREADS=1 python examples/lowdiff_oracle.py RUN --true-stages 2 -- --steps 16 --teacher-steps 0 \\
        --num 1000 --reference /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz \\
        --set "method.stage_steps={16: [8, 8, 16]}"

Runs ``fewstep eval RUN ARGS...`` (everything after ``--``) with the cascade's stages 0 .. K-1 (K =
--true-stages) given as "students" that return the block averages of the eval's own reference images, in the
order the eval samples them (batches of its rows, first to last), so the remaining stages run on true
low-resolution images. A diagnostic, not a benchmark row: the condition comes from the reference set itself, so
the FID it prints is not comparable with generated rows. Compare it with the same command without the
replacement to see how much the generated low-resolution stages cost. Writes RUN/summary.json like ``fewstep
eval`` (use a copy of the run folder).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--true-stages", type=int, required=True, help="K: stages 0 .. K-1 are the true images")
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("lowdiff_oracle: give fewstep eval's arguments after --")
    cut = argv.index("--")
    args, eval_args = ap.parse_args(argv[:cut]), argv[cut + 1:]
    if "--reference" not in eval_args or "--num" not in eval_args:
        raise SystemExit("lowdiff_oracle: pass --num and --reference to fewstep eval (the true images are its reference)")
    reference = eval_args[eval_args.index("--reference") + 1]
    num = int(eval_args[eval_args.index("--num") + 1])

    from fewstep import cascade
    from fewstep.data import DataConfig, build_dataset

    original = cascade.cascade_sample
    state = {"row": 0, "true": None}

    def with_true_stages(denoise, noise, resolutions, steps, sampling_sigmas, **kwargs):
        if not 0 < args.true_stages < len(resolutions):
            raise SystemExit(f"lowdiff_oracle: --true-stages must be in 1..{len(resolutions) - 1}")
        if state["true"] is None:  # the eval's reference images at the model's size, as the eval reads them
            data = build_dataset(DataConfig(source=reference, resolution=resolutions[-1], channels=noise.shape[1],
                                            class_conditional=True))
            state["true"] = data.get(torch.arange(num))[0]
        b = noise.shape[0]
        rows = state["true"][state["row"]:state["row"] + b].to(noise)
        state["row"] = (state["row"] + b) % num
        truth = {k: (lambda eps, low, r=resolutions[k]: cascade.downsample(rows, r)) for k in range(args.true_stages)}
        return original(denoise, noise, resolutions, steps, sampling_sigmas, **{**kwargs, "students": truth})

    cascade.cascade_sample = with_true_stages
    from fewstep.cli import main as fewstep_main

    return fewstep_main(["eval", args.run, *eval_args])


if __name__ == "__main__":
    sys.exit(main())
