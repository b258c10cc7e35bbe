"""``istr`` entry point: subcommands dispatch to the library; no logic here (docs/architecture.md#layers)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _synth(args: argparse.Namespace) -> None:
    from istr.data.synth import generate_synthetic_coco

    summary = generate_synthetic_coco(
        Path(args.out),
        args.train,
        args.val,
        seed=args.seed,
        image_size=args.size,
        min_instances=args.min_instances,
        max_instances=args.max_instances,
    )
    print(json.dumps(summary, indent=2))


def _fit_codec(args: argparse.Namespace) -> None:
    from istr.codecs.fit import fit_or_load_codec
    from istr.config import load_config
    from istr.data.build import build_dataset, ensure_dataset, split_paths

    cfg = load_config(args.config, args.overrides)
    ensure_dataset(cfg.data)
    train_set = build_dataset(cfg.data, "train", train=False)
    codec, stats, path = fit_or_load_codec(
        cfg.codec, split_paths(cfg.data, "train")[0], train_set.coco, Path(cfg.cache_dir), cfg.seed
    )
    if args.out:
        codec.save(Path(args.out))
        path = Path(args.out)
    print(json.dumps({"codec": path.as_posix(), **stats}, indent=2))


def _codec_report(args: argparse.Namespace) -> None:
    from istr.codecs import CODECS
    from istr.config import load_config
    from istr.data.build import ensure_dataset
    from istr.io import claim_output_folder
    from istr.reports.codec import codec_report, format_markdown

    cfg = load_config(args.config, args.overrides)
    out = claim_output_folder(Path(args.out))
    ensure_dataset(cfg.data)
    types = args.types.split(",") if args.types else list(CODECS)
    dims = [int(d) for d in args.dims.split(",")]
    report = codec_report(cfg, types, dims, out, args.max_val_images)
    print(format_markdown(report))
    print(f"written to {args.out}/codec_report.csv and .md")


def _pretrain_backbone(args: argparse.Namespace) -> None:
    from istr.config import load_config
    from istr.engine.pretrain import resolve_backbone_weights
    from istr.sweep.spec import resolve_preset

    cfg = load_config(resolve_preset(args.preset), [*args.overrides, "model.pretrained=auto"])
    print(f"pretrained backbone: {resolve_backbone_weights(cfg)}")


def _train(args: argparse.Namespace) -> None:
    from istr.config import config_hash, load_config
    from istr.engine.train import train

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-{config_hash(cfg)}"
    metrics = train(cfg, out, resume=args.resume)
    if metrics:
        print(json.dumps(metrics, indent=2))
        print(f"run dir: {out}")


def _eval(args: argparse.Namespace) -> None:
    from istr.engine.evaluate import evaluate_run
    from istr.engine.predict import load_run

    run = load_run(Path(args.run), args.device)
    detections = Path(args.save_detections) if args.save_detections else None
    print(json.dumps(evaluate_run(run.cfg, run.model, run.codec, run.device, Path(args.run), detections), indent=2))


def _predict(args: argparse.Namespace) -> None:
    from istr.engine.predict import load_run, predict_images
    from istr.io import claim_output_folder

    out = claim_output_folder(Path(args.out))
    run = load_run(Path(args.run), args.device)
    json_path = Path(args.json) if args.json else None
    predict_images(run, [Path(p) for p in args.images], out, args.score_threshold, json_path, print)


def _quickstart(args: argparse.Namespace) -> None:
    from istr.engine.quickstart import run_quickstart
    from istr.io import claim_output_folder

    summary = run_quickstart(Path(args.config), claim_output_folder(Path(args.out)), args.overrides)
    print(summary.read_text())
    print(f"results written to {args.out}/ (summary.md, predictions/, runs/)")


def build_parser() -> argparse.ArgumentParser:
    from istr.config import SynthConfig  # the generator's defaults, shared with data.synth

    parser = argparse.ArgumentParser(prog="istr", description="ISTR instance segmentation workbench")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate a COCO-format synthetic shapes dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=SynthConfig.num_train)
    p.add_argument("--val", type=int, default=SynthConfig.num_val)
    p.add_argument("--seed", type=int, default=SynthConfig.seed)
    p.add_argument("--size", type=int, default=SynthConfig.image_size, help="image side in pixels")
    p.add_argument("--min-instances", type=int, default=SynthConfig.min_instances)
    p.add_argument("--max-instances", type=int, default=SynthConfig.max_instances)
    p.set_defaults(func=_synth)

    for name, func, helptext in (
        ("fit-codec", _fit_codec, "fit (or load from cache) the mask codec"),
        ("train", _train, "train + evaluate one model"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", required=True, help="preset YAML, e.g. experiments/tiny.yaml")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        p.add_argument("--out", default=None, help="run dir (train) or codec file (fit-codec)")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt")
        p.set_defaults(func=func)

    p = sub.add_parser("pretrain-backbone", help="pretrain the backbone of model.pretrained=auto once (cached)")
    p.add_argument("--preset", default="tiny", help="experiments/<NAME>.yaml or a YAML path")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=_pretrain_backbone)

    p = sub.add_parser("codec-report", help="reconstruction IoU + oracle segm AP of mask codecs on the val masks")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--types", default=None, help="comma-separated codec types (default: every registered codec)")
    p.add_argument("--dims", default="20,40,60,80,100")
    p.add_argument("--out", default="results/codec_report")
    p.add_argument("--max-val-images", type=int, default=0, help="0 = all val images")
    p.set_defaults(func=_codec_report)

    p = sub.add_parser("eval", help="COCO-evaluate a run dir on its val split -> eval.json")
    p.add_argument("--run", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--save-detections", default=None, metavar="FILE", help="also write the detections (results json)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="draw prediction overlays for image files")
    p.add_argument("--run", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--score-threshold", type=float, default=0.3, help="draw detections scoring at least this")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every detection as a COCO results json")
    p.set_defaults(func=_predict)
    from istr.ablate import add_parser as add_ablate_parser
    from istr.bench import add_parsers as add_bench_parsers
    from istr.sweep.cli import add_parsers as add_sweep_parsers

    add_bench_parsers(sub)
    add_sweep_parsers(sub)
    add_ablate_parser(sub)

    p = sub.add_parser("quickstart", help="train + evaluate ONE model (tiny preset) -> summary.md with overlays")
    p.add_argument("--config", default="experiments/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--out", default="results/quickstart")
    p.set_defaults(func=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from istr.config import ConfigError
    from istr.data.coco import DatasetError
    from istr.engine.checkpoint import CheckpointError
    from istr.engine.rundir import RunDirError
    from istr.engine.step import NonFiniteLossError
    from istr.io import ForeignFolderError
    from istr.registry import UnknownArmError

    expected = (ConfigError, UnknownArmError, DatasetError, NonFiniteLossError, RunDirError, CheckpointError,
                ForeignFolderError, FileNotFoundError, FileExistsError)
    try:
        args.func(args)
    except expected as err:
        print(f"istr {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
