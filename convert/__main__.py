"""`python -m convert SRC DST [--dtype bfloat16]`: a transformers DiffusionGemma folder -> a diffjax checkpoint.

With `--to-hf` the other way: a diffjax checkpoint -> a folder `from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from convert import CheckpointError, convert_checkpoint, load, load_generation_config, save_hf
from convert.atomic import refuse_existing

PHASES = {"read": "reading ", "write": "writing "}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a transformers DiffusionGemma checkpoint folder into a diffjax checkpoint.",
    )
    parser.add_argument("src", help="transformers folder (config.json + model.safetensors[.index.json])")
    parser.add_argument("dst", help="output directory (written atomically)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                        help="cast every weight (default: keep the stored dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--to-hf", action="store_true",
                        help="the reverse: SRC is a diffjax checkpoint, DST becomes a transformers folder")
    parser.add_argument("--max-shard-size", default="5GB", help="shard size for --to-hf (default 5GB)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    # Only our logger: jax's INFO chatter about missing TPU backends is noise here.
    logger = logging.getLogger("convert")
    logger.setLevel(logging.INFO)
    logger.addHandler(RichHandler(console=console, show_path=False))
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=console, disable=args.quiet,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(PHASES.get(phase, phase), total=total)
            bar.update(tasks[phase], completed=done, total=total)

        try:
            refuse_existing(pathlib.Path(args.dst), args.overwrite)  # before minutes of reading
            if args.to_hf:
                config, params = load(args.src, args.dtype, as_numpy=True)
                save_hf(params, config, args.dst, load_generation_config(args.src) or None,
                        max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=progress)
            else:
                convert_checkpoint(args.src, args.dst, args.dtype, overwrite=args.overwrite, progress=progress)
        except (CheckpointError, FileExistsError) as exc:
            bar.stop()
            # Plain print: rich would wrap long paths and read shapes like [64, 32] as markup.
            print(f"error: {exc}", file=sys.stderr)
            return 1
    console.print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
