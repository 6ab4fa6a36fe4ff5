"""`python -m convert SRC DST [--dtype bfloat16]`: a transformers DiffusionGemma folder -> a diffjax checkpoint.

With `--to-hf` the other way: a diffjax checkpoint -> a folder `from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import logging
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
from convert.atomic import check_destination
from convert.files import companion_files
from convert.hf import parse_size

PHASES = {"read": "reading ", "write": "writing "}


def shard_size(text: str) -> int:
    """`parse_size` as an argparse type: its message shown as the flag's error, not as a trace."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a transformers DiffusionGemma checkpoint folder into a diffjax checkpoint.",
    )
    parser.add_argument("src", help="transformers folder (config.json + model.safetensors[.index.json])")
    parser.add_argument("dst", help="output directory (written atomically)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                        help="cast every weight (default: keep the stored dtype)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is an empty folder or a checkpoint (a folder with other files is "
                             "refused)")
    parser.add_argument("--to-hf", action="store_true",
                        help="the reverse: SRC is a diffjax checkpoint, DST becomes a transformers folder")
    parser.add_argument("--max-shard-size", default="5GB", type=shard_size,
                        help="shard size for --to-hf: bytes or a number with a unit, e.g. 500MB, 2GiB (default 5GB)")
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
            if args.to_hf:
                check_destination(args.src, args.dst, args.overwrite)  # before minutes of reading
                # The conversion reads every weight anyway: NaN or inf is refused in both directions.
                config, params = load(args.src, args.dtype, as_numpy=True, check_finite=True)
                save_hf(params, config, args.dst, load_generation_config(args.src, carried=True) or None,
                        max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=progress,
                        extra_files=companion_files(args.src))
            else:
                convert_checkpoint(args.src, args.dst, args.dtype, overwrite=args.overwrite, progress=progress)
        except (CheckpointError, OSError) as exc:
            bar.stop()
            # Plain print: rich would wrap long paths and read shapes like [64, 32] as markup.
            print(f"error: {_describe(exc, args.src, args.dst)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # the atomic write has already removed its temporary directory
            bar.stop()
            print("error: interrupted", file=sys.stderr)
            return 130
    console.print(f"wrote {args.dst}")
    return 0


def _describe(exc: CheckpointError | OSError, src: str, dst: str) -> str:
    """One line naming the path and the reason; an OS error raised without a file name (a full disk during a
    write) gets the conversion's two paths instead."""
    if not isinstance(exc, OSError) or exc.strerror is None:  # ours, message complete (FileExistsError too)
        return str(exc)
    if exc.filename is None:
        return f"{exc.strerror} (converting {src} -> {dst})"
    where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"  # a rename
    return f"{where}: {exc.strerror}"


if __name__ == "__main__":
    sys.exit(main())
