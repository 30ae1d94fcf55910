"""The ``layerloop`` command line.

    layerloop demo-data OUT --n N --seed S        render demo scenes in the RORem layout
    layerloop build CONFIG [--out DIR] [--executor local|ray] [--address ADDR] [key=value ...]
    layerloop train CONFIG [--out DIR] [key=value ...]   train a LoRA from shards (resumes)
    layerloop generate CONFIG [--out DIR] [key=value ...]  candidates from a trained LoRA (a build)
    layerloop self-improve CONFIG --rounds N [--out DIR] [--executor local|ray] [key=value ...]
    layerloop evaluate CONFIG [--out DIR] [--executor local|ray] [key=value ...]  methods on a held-out set
    layerloop compare DIR DIR ...                  metrics of evaluations / loops side by side
    layerloop models list|pull CONFIG [--cache-dir DIR]  which weights a config needs / fetch them
    layerloop inspect DIR [--samples N] [--key KEY]
    layerloop report DIR                           (re)write DIR/report/
    layerloop layers CHECKPOINT --background IMG --layer X0,Y0,X1,Y1=CAPTION ... --out FILE.psd  multi-layer BFS
    layerloop export-layers DIR --key KEY --out FILE.psd  a stored sample's B and F as a layered PSD

CONFIG is a YAML path or the name of a packaged config (``demo`` = configs/demo.yaml).

-v / --verbose (before or after the command): the package's INFO lines and Ray's own output on the terminal;
without it Ray's output goes to OUT/logs/ray.log and the package's full log to OUT/logs/layerloop.log.
Progress bars go to stderr when it is a terminal (--no-progress turns them off).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from layerloop import logs


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from layerloop.datasets.demo_scenes import generate_demo_data

    out = generate_demo_data(args.out, n=args.n, seed=args.seed, size=args.size)
    print(f"wrote {args.n} demo scenes (seed {args.seed}, {args.size} px) to {out}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from layerloop.config import load_config
    from layerloop.pipelines.build import build, run_dir_for

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    config = load_config(args.config, overrides)
    run_dir = run_dir_for(config, args.out)
    logs.set_run_dir(run_dir)  # on an object store: logged locally, uploaded to RUN/logs/ by the build
    result = build(config, out=args.out, executor=args.executor, progress=not args.no_progress)
    print(result.summary())
    return 0


@contextlib.contextmanager
def _staged_out(args: argparse.Namespace):
    """``--out s3://...`` for a command that writes a local folder: it runs in a staging folder synced to the
    store under the prefix's lease (``storage.Staged``); a local ``--out`` is used as it is."""
    if not args.out or _local(args.out):
        yield
        return
    from layerloop import storage

    remote = args.out
    with storage.Staged(remote) as local:
        args.out = str(local)
        print(f"layerloop: staging {remote} in {local} (synced to the store during the run and at its end)",
              file=sys.stderr)
        try:
            yield
        finally:
            args.out = remote


def _local(run_dir: object) -> bool:
    from layerloop import storage

    return not storage.is_remote(run_dir)


def _cmd_models(args: argparse.Namespace) -> int:
    from layerloop.config import load_config, read_yaml, resolve_config_path
    from layerloop.pipelines.preflight import model_status, pull_models

    data = read_yaml(resolve_config_path(args.config))
    if "methods" in data and "heldout" in data:  # an evaluation: its methods' and its metrics' models
        from layerloop.evaluation.config import load_evaluate_config
        from layerloop.evaluation.run import models_config

        config = models_config(load_evaluate_config(args.config, args.overrides))
    else:
        config = load_config(args.config, args.overrides)
    statuses = pull_models(config, args.cache_dir) if args.action == "pull" else model_status(config, args.cache_dir)
    if not statuses:
        print(f"{args.config}: no model weights needed (classical or tiny models only)")
        return 0
    for status in statuses:
        where = str(status.path) if status.path else f"MISSING ({status.problem})"
        print(f"{status.ref.stage:<24} {status.ref.label():<55} {where}")
    missing = [s for s in statuses if s.path is None]
    if missing and args.action == "list":
        print(f"\n{len(missing)} missing: fetch with `layerloop models pull {args.config}`"
              + (f" --cache-dir {args.cache_dir}" if args.cache_dir else ""))
    return 1 if missing else 0


def _cmd_train(args: argparse.Namespace) -> int:
    with _staged_out(args):
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    from layerloop.training import TrainConfig, load_training, run_training

    cfg = load_training(args.config, list(args.overrides))
    logs.set_run_dir(cfg.out_dir(args.out))
    if not isinstance(cfg, TrainConfig):  # a recipe: its stages in order, each into OUT/<stage>/
        from layerloop.training.recipe import run_recipe

        result = run_recipe(cfg, args.out)
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
        for stage, summary in result["stages"].items():
            if summary.get("skipped"):
                line = f"layerloop: {stage}: already trained, skipped; weights in {summary.get('final')}"
            else:
                line = _train_line(summary).replace("layerloop: ", f"layerloop: {stage}: ", 1)
            print(line, file=sys.stderr)
        return 0
    summary = run_training(cfg, args.out)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    print(_train_line(summary), file=sys.stderr)
    return 0


def _train_line(summary: dict) -> str:
    """One line for a person: what the run did and where the weights are (stdout keeps the JSON summary)."""
    last = summary.get("last") or {}
    loss = f", final loss {last['loss']:.4g}" if isinstance(last.get("loss"), (int, float)) else ""
    resumed = summary.get("resumed_from")
    start = f" (resumed from step {resumed})" if resumed else ""
    if summary.get("stopped"):
        return f"layerloop: stopped after step {summary.get('step')}{start}{loss}; re-run to resume"
    if summary.get("final"):
        seconds = summary.get("seconds")
        took = f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
        return (f"layerloop: trained {summary.get('step')} steps{start}{took}{loss}; weights in {summary['final']}"
                f" (checkpoint {str(summary.get('checkpoint_hash', ''))[:12]})")
    return f"layerloop: training finished at step {summary.get('step')}{loss}; output in {summary.get('out_dir')}"


def _cmd_evaluate(args: argparse.Namespace) -> int:
    with _staged_out(args):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from layerloop.evaluation.config import load_evaluate_config
    from layerloop.evaluation.run import evaluate

    cfg = load_evaluate_config(args.config, list(args.overrides))
    logs.set_run_dir(cfg.out_dir(args.out).resolve())
    result = evaluate(cfg, out=args.out, executor=args.executor, progress=not args.no_progress,
                      config_ref=args.config)
    print(result.table, end="")
    print(f"layerloop: evaluated {len(cfg.methods)} method(s) on {result.metrics['n']} held-out samples; "
          f"{result.out / 'metrics.json'}, {result.out / 'table.md'}, sheets in {result.out / 'sheets'}",
          file=sys.stderr)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from layerloop.evaluation.compare import compare_table

    print(compare_table(args.dirs), end="")
    return 0


def _cmd_self_improve(args: argparse.Namespace) -> int:
    with _staged_out(args):
        return _self_improve(args)


def _self_improve(args: argparse.Namespace) -> int:
    from layerloop.selfimprove.config import load_selfimprove_config
    from layerloop.selfimprove.loop import self_improve

    cfg = load_selfimprove_config(args.config, list(args.overrides))
    logs.set_run_dir(cfg.out_dir(args.out).resolve())
    result = self_improve(cfg, rounds=args.rounds, out=args.out, executor=args.executor,
                          progress=not args.no_progress)
    for r in result["rounds"]:
        rate = f"{100 * r['acceptance_rate']:.1f}%" if r["acceptance_rate"] is not None else "n/a"
        print(f"round {r['round']}: {r['candidates']} candidates, {r['ok']} ok, {r['accepted']} accepted ({rate}), "
              f"checkpoint {r['checkpoint_hash'][:12]}")
    print(f"{result['out']}: {len(result['rounds'])} round(s) in {result['seconds']:.1f} s; report {result['report']}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from layerloop.selfimprove.layout import is_selfimprove_dir  # the loop's modules only for a loop

    if is_selfimprove_dir(args.dir):
        from layerloop import storage
        from layerloop.selfimprove.lineage import describe_loop, trace

        if args.key and not _local(args.dir):
            folder = _loop_staging(args.dir)
        else:
            folder = args.dir if _local(args.dir) else _loop_records(args.dir)
        with contextlib.nullcontext() if folder is args.dir else storage.viewing(args.dir, folder):
            if args.key:
                text = json.dumps(trace(folder, args.key), indent=2, sort_keys=True, default=str)
            else:
                text = describe_loop(folder)  # JSON files only: no pyarrow
        # the mirror's paths are the store's: name the URL, not the local copy
        print(text if folder is args.dir else text.replace(str(folder), str(args.dir).rstrip("/")))
        return 0
    from layerloop.report import inspect_run, trace_sample

    if args.key:
        print(json.dumps(trace_sample(args.dir, args.key), indent=2, sort_keys=True, default=str))
    else:
        print(inspect_run(args.dir, samples=args.samples))
    return 0


def _loop_records(url: str) -> Path:
    """A self-improvement loop on an object store, for ``inspect``: its records (JSON, JSONL, YAML and
    parquet files; no tars, images or checkpoints) copied into a local mirror that the loop's readers take."""
    from layerloop import storage

    root = storage.location(url)
    records = [p for p in root.rglob("*") if p.suffix in (".json", ".jsonl", ".yaml", ".parquet")]
    local = storage.mirror(records, root, storage.cache_dir(root.url, "inspect"))
    print(f"layerloop: {url} read from a local copy of its records in {local}", file=sys.stderr)
    return local


def _loop_staging(url: str) -> Path:
    """The staging folder of a loop on an object store, for ``inspect --key``: a trace reads the loop's tars
    and follows lineage records that name the staging folder, so it runs where the loop ran."""
    from layerloop import storage
    from layerloop.errors import ConfigError
    from layerloop.selfimprove.layout import is_selfimprove_dir

    staging = storage.staging_dir(url)
    if not is_selfimprove_dir(staging):
        raise ConfigError(f"{url}: tracing a sample of a loop on an object store reads its tars and follows its "
                          f"lineage records, which name the staging folder of the machine that ran it; run the "
                          f"same command there (its staging folder is {staging}), or `layerloop self-improve` once "
                          f"with --out {url} here to pull it")
    return staging


def _cmd_report(args: argparse.Namespace) -> int:
    from layerloop.report import write_report

    from layerloop.selfimprove.lineage import is_selfimprove_dir

    if is_selfimprove_dir(args.dir):
        if not _local(args.dir):
            from layerloop.errors import ConfigError

            raise ConfigError(f"{args.dir}: the report of a self-improvement loop on an object store is written "
                              f"by the loop itself (report/ there); `layerloop inspect {args.dir}` reads the loop")
        from layerloop.selfimprove.report import write_round_report, write_summary_report

        rounds = sorted(p for p in (Path(args.dir) / "rounds").glob("round-*") if (p / "scores.parquet").exists())
        for round_path in rounds:
            write_round_report(round_path, rows=args.rows)
        write_summary_report(args.dir, rounds)
        print(f"wrote {Path(args.dir) / 'report'} and the reports of {len(rounds)} round(s)")
        return 0
    stats = write_report(args.dir, rows=args.rows)
    print(f"wrote {str(args.dir).rstrip('/')}/report: {stats.get('samples_ok', 0)} samples ok")
    return 0


def _cmd_export_layers(args: argparse.Namespace) -> int:
    from layerloop.export import sample_layers, stored_sample, write_psd

    sample = stored_sample(args.dir, args.key)
    background, layers = sample_layers(sample)
    out = write_psd(args.out, background, layers)
    height, width = background.shape[:2]
    print(f"wrote {out}: {sample.key} ({sample.kind}), {width}x{height}, background + {len(layers)} layer(s)")
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    import numpy as np

    from layerloop.datasets.imageio import decode_image, to_rgb
    from layerloop.export import parse_layer_spec, write_psd
    from layerloop.samples import encode_png
    from layerloop.seeds import seed63

    specs = [parse_layer_spec(spec) for spec in args.layer]
    if args.reference and len(args.reference) not in (1, len(specs)):
        raise ValueError(f"{len(args.reference)} --reference images for {len(specs)} layers: give one for all "
                         "layers or one per layer")
    background = to_rgb(decode_image(args.background, key="background"), key="background")
    references = None
    if args.reference:
        images = [to_rgb(decode_image(path, key="reference"), key="reference") for path in args.reference]
        references = images * len(specs) if len(images) == 1 else images

    import torch

    from layerloop.models.bfs_pipeline import BFSPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    pipe = BFSPipeline.from_checkpoint(args.checkpoint, device=device, dtype=dtype, guidance=args.guidance)
    if references is not None:
        pipe.load_redux(args.redux_model)
    step = pipe.size_multiple
    height, width = background.shape[0] // step * step, background.shape[1] // step * step
    if (height, width) != background.shape[:2]:
        print(f"layerloop: background cropped from {background.shape[1]}x{background.shape[0]} to {width}x{height} "
              f"(right and bottom edges): sides must be multiples of {step}", file=sys.stderr)
        background = np.ascontiguousarray(background[:height, :width])
    seeds = [seed63(args.seed, "layers", i) for i in range(len(specs))]
    result = pipe.layers(background, [box for box, _ in specs], [caption for _, caption in specs], seeds,
                         steps=args.steps, noise=args.noise, references=references)
    names = [f"{i + 1}: {caption}" if caption else f"layer {i + 1}" for i, (_, caption) in enumerate(specs)]
    out = write_psd(args.out, result.background, list(zip(names, result.layers)))
    print(f"wrote {out}: {width}x{height}, background + {len(result.layers)} layer(s), {args.steps} steps, "
          f"seed {args.seed}")
    if args.png:
        stem = Path(args.out).with_suffix("")
        files = {f"{stem}.background.png": (result.background, "RGB"), f"{stem}.composite.png": (result.composite, "RGB")}
        files.update({f"{stem}.layer-{i + 1}.png": (layer, "RGBA") for i, layer in enumerate(result.layers)})
        from layerloop.files import write_atomic

        for path, (image, mode) in files.items():
            write_atomic(path, encode_png(image, mode))
        print(f"wrote {len(files)} PNGs next to it: {stem.name}.background.png, .layer-N.png, .composite.png")
    return 0


def _config_command(commands: Any, name: str, help_text: str, config_help: str, overrides_help: str,
                    out_help: str) -> argparse.ArgumentParser:
    """A command that runs a config: ``NAME CONFIG [key=value ...] --out DIR --no-progress``."""
    command = commands.add_parser(name, help=help_text)
    command.add_argument("config", help=config_help)
    command.add_argument("overrides", nargs="*", help=overrides_help)
    command.add_argument("--out", help=out_help)
    command.add_argument("--no-progress", action="store_true")
    return command


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layerloop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(*VERBOSE_FLAGS, action="store_true", default=False, help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-data", help="render demo scenes in the RORem layout")
    demo.add_argument("out")
    demo.add_argument("--n", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", type=int, default=256)
    demo.set_defaults(func=_cmd_demo_data)

    build = _config_command(commands, "build", "run a synthesis pipeline into a run directory (resumable)",
                            "YAML config path or packaged config name (demo, rorem)",
                            "key=value overrides, e.g. source.n=16", "run directory (default: runs/<config name>)")
    build.add_argument("--executor", choices=("local", "ray"), help="default: the config's (ray)")
    build.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    build.set_defaults(func=_cmd_build)

    train = _config_command(commands, "train", "train a LoRA (BFS generator, ...) from shards, resumably",
                            "training config (train_bfs_demo, train_bfs, or a YAML path), or a recipe "
                            "(train_bfs_recipe_demo: rgba-vae -> phi -> stage1 -> stage2 into OUT/<stage>/)",
                            "key=value overrides, e.g. steps=200 data.accepted.weight=2",
                            "output directory (checkpoints, metrics.jsonl, final/)")
    train.set_defaults(func=_cmd_train)

    generate = _config_command(
        commands, "generate", "generate candidates with a trained LoRA (a build whose config has a generate stage)",
        "generation config (e.g. generate_bfs_demo)", "key=value overrides, e.g. stages.generate-bfs.checkpoint=DIR",
        "run directory for the candidate shards")
    generate.add_argument("--executor", choices=("local", "ray"))
    generate.add_argument("--address", help="Ray cluster address")
    generate.set_defaults(func=_cmd_build)

    improve = _config_command(
        commands, "self-improve", "rounds of train -> generate -> score -> filter -> feed back (resumable)",
        "self-improvement config (selfimprove_bfs_demo, or a YAML path)",
        "key=value overrides, e.g. accepted_weight=3", "output directory (default: runs/<config name>)")
    improve.add_argument("--rounds", type=int, help="number of rounds (default: the config's); more rounds "
                         "extend a finished loop")
    improve.add_argument("--executor", choices=("local", "ray"), help="default: the config's (ray)")
    improve.set_defaults(func=_cmd_self_improve)

    evaluate = _config_command(
        commands, "evaluate", "measure methods on a fixed held-out set (the BFS paper's metrics; resumable)",
        "evaluation config (evaluate_bfs_demo, evaluate_decompose_demo, evaluate_bfs_rorem, or a YAML path)",
        "key=value overrides, e.g. heldout.select=500", "output directory (default: runs/<config name>)")
    evaluate.add_argument("--executor", choices=("local", "ray"), help="default: the config's (ray)")
    evaluate.set_defaults(func=_cmd_evaluate)

    compare = commands.add_parser("compare", help="one table of the metrics of several evaluations or loops")
    compare.add_argument("dirs", nargs="+", help="evaluation directories (metrics.json) or self-improvement "
                         "directories (each round's eval.json)")
    compare.set_defaults(func=_cmd_compare)

    models = commands.add_parser("models", help="list or pull the model weights a config needs")
    models.add_argument("action", choices=("list", "pull"))
    models.add_argument("config")
    models.add_argument("overrides", nargs="*", help="key=value overrides")
    models.add_argument("--cache-dir", help="Hugging Face cache to use (default: HF_HOME / HF_HUB_CACHE)")
    models.set_defaults(func=_cmd_models)

    inspect = commands.add_parser("inspect", help="summarise a run directory")
    inspect.add_argument("dir")
    inspect.add_argument("--samples", type=int, default=3)
    inspect.add_argument("--key", help="show one sample's full metadata and index row")
    inspect.set_defaults(func=_cmd_inspect)

    report = commands.add_parser("report", help="(re)write a run's report/ (contact sheet, stats.json)")
    report.add_argument("dir")
    report.add_argument("--rows", type=int, default=8)
    report.set_defaults(func=_cmd_report)

    export_layers = commands.add_parser("export-layers", help="write a stored sample's background and foreground "
                                        "as a layered PSD (background + foreground layers)")
    export_layers.add_argument("dir", help="run directory")
    export_layers.add_argument("--key", required=True, help="the sample's key")
    export_layers.add_argument("--out", required=True, help="PSD file to write")
    export_layers.set_defaults(func=_cmd_export_layers)

    layers = commands.add_parser("layers", help="multi-layer synthesis with a BFS checkpoint: foregrounds added back "
                                 "to front, each over the result so far; written as a layered PSD")
    layers.add_argument("checkpoint", help="final/ of a BFS stage1 / stage2 training run")
    layers.add_argument("--background", required=True, help="background image (sides cropped to the model's multiple)")
    layers.add_argument("--layer", action="append", required=True, metavar="X0,Y0,X1,Y1=CAPTION",
                        help="one per layer, back to front: its box in pixels (ends exclusive) and caption")
    layers.add_argument("--seed", type=int, default=0, help="layer i's noise seed is derived from it and i")
    layers.add_argument("--steps", type=int, default=28)
    layers.add_argument("--noise", choices=("shared", "independent"), default="shared")
    layers.add_argument("--guidance", type=float, help="default: the one the checkpoint was trained with")
    layers.add_argument("--reference", action="append", metavar="IMAGE",
                        help="reference image (FLUX.1 Redux): once for every layer, or once per layer in order")
    layers.add_argument("--redux-model", default="black-forest-labs/FLUX.1-Redux-dev",
                        help="Redux weights for --reference: hub id or local folder")
    layers.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    layers.add_argument("--out", required=True, help="PSD file to write")
    layers.add_argument("--png", action="store_true", help="also write OUT.background.png, OUT.layer-N.png and "
                        "OUT.composite.png")
    layers.set_defaults(func=_cmd_layers)
    for sub in commands.choices.values():  # -v also after the subcommand; SUPPRESS keeps a -v given before
        sub.add_argument(*VERBOSE_FLAGS, action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


VERBOSE_FLAGS = ("-v", "--verbose")
VERBOSE_HELP = ("show the package's INFO lines and Ray's own output (by default Ray's output goes to "
                "OUT/logs/ray.log)")


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors meant for the user are one line on stderr and an exit code
    (``layerloop/errors.py`` lists them)."""
    from layerloop import errors

    parser = make_parser()
    # key=value overrides may come before or after options: collect the ones argparse leaves over
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) not in ("build", "generate", "models", "train", "self-improve",
                                                                "evaluate") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    logs.configure(verbose=args.verbose, progress=not getattr(args, "no_progress", False))
    try:
        return args.func(args)
    except BrokenPipeError:  # `layerloop inspect DIR | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("layerloop: interrupted; re-run the same command to resume", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    except Exception as raised:
        code, message = _user_error(errors.unwrap(raised))
        if code is None:
            raise
        print(f"layerloop: {message}", file=sys.stderr)
        return code
    finally:
        logs.restore()


def _user_error(error: BaseException) -> tuple[int | None, str]:
    """(exit code, one-line message) for the errors written for the user; (None, "") for a bug."""
    from layerloop import errors

    # The classes of modules this command never imported match nothing (``()``): an error cannot come from
    # a module that was not loaded, and importing them (pydantic, the Hugging Face hub) only slows the message.
    validation_error = _loaded_class("pydantic_core", "ValidationError")
    models_missing = _loaded_class("layerloop.pipelines.preflight", "ModelsMissing")
    run_errors = (_loaded_class("layerloop.pipelines.runs", "RunLockedError"),
                  _loaded_class("layerloop.pipelines.runs", "RunMismatchError"))
    unknown_sample = _loaded_class("layerloop.report.scan", "UnknownSampleError")

    if isinstance(error, validation_error):
        return errors.EXIT_REFUSED, f"invalid config:\n{error}"
    if isinstance(error, errors.LayerloopError) and not isinstance(error, errors.EnvironmentFailure):
        return error.exit_code, str(error)
    if isinstance(error, (models_missing, *run_errors, ValueError)):
        return errors.EXIT_REFUSED, str(error)
    if isinstance(error, unknown_sample):
        return errors.EXIT_REFUSED, error.args[0] if error.args else str(error)
    if isinstance(error, OSError) and error.errno is None:  # ours: "X is not a run directory", ...
        return errors.EXIT_REFUSED, str(error)
    if isinstance(error, OSError):  # the system's: disk full, read-only, permission denied ...
        return errors.EXIT_ENVIRONMENT, errors.describe_os_error(error)
    return None, ""


def _loaded_class(module: str, name: str) -> type | tuple[()]:
    """``module.name`` when ``module`` is loaded, else ``()`` (``isinstance(x, ())`` is False)."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name) if loaded is not None else ()


if __name__ == "__main__":
    sys.exit(main())
