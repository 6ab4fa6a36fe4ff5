"""The `diffjax` command: generate (with a live view of the canvas being denoised), train, convert, bench, info.

    diffjax generate 52817                                        # embedded demo model: sorts digits
    diffjax generate --checkpoint ckpt/ --max-new-tokens 512 "Why is the sky blue?"
    diffjax train --task sort --steps 2000 --batch-size 32 --out runs/sort    # then: generate --checkpoint runs/sort
    diffjax convert hf-folder/ ckpt/ --dtype bfloat16
    diffjax bench [--json out.json]                               # diffjax vs transformers, same weights
    diffjax info [--checkpoint DIR | --preset 26b|tiny|demo|default]

A checkpoint folder with a task.json (written by `diffjax train --task NAME`) takes that task's puzzles as
prompts and decodes with its symbol tokenizer.

Every error the user can cause (bad flags, a missing or malformed checkpoint) ends in one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from convert.__main__ import shard_size
from diffjax.bench import output_file
from diffjax.config import (
    AR_TARGETS,
    BLOCK_LAYOUTS,
    DEFAULT_AR_TARGETS,
    GLOBAL_ATTENTION_IMPLEMENTATIONS,
    MLP_IMPLEMENTATIONS,
    MOE_IMPLEMENTATIONS,
    NORM_IMPLEMENTATIONS,
    PROJECTION_LAYOUTS,
    ROUTING_IMPLEMENTATIONS,
    SLIDING_ATTENTION_IMPLEMENTATIONS,
    KernelTiles,
    require_pretiled_readers,
)
from diffjax.generate import STATISTICS, GenerationSettings
from diffjax.layout import arrange_for_gpu

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from diffjax.config import Config
    from diffjax.tasks import Task
    from diffjax.tokenizer import AnyTokenizer

EXIT_USAGE = 2
# The embedded default model: a DiffusionGemma-architecture model that diffjax trained on a task.
DEFAULT_MODEL_DIR = pathlib.Path(__file__).parent / "assets" / "demo"


# C0/C1 control characters other than newline and tab: an untrained model (or a hostile prompt) could otherwise
# emit terminal escape sequences into the user's terminal.
_CONTROL = {c: "\ufffd" for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0))}


def printable(text: str) -> str:
    """`text` safe to show on a terminal: control characters (except newline and tab) become U+FFFD."""
    return text.translate(_CONTROL)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block and exits by itself; the CLI wants one line and control of exit.
    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see `{self.prog} --help`)")


# ------------------------------------------------------------------------------------------- models


@dataclasses.dataclass
class LoadedModel:
    """Everything `generate` needs: weights, config, tokenizer and the checkpoint's sampler defaults."""

    config: Config
    params: dict[str, Any]
    tokenizer: AnyTokenizer
    generation_defaults: dict[str, Any]
    name: str
    task: Task | None = None  # when the checkpoint was trained on one: prompts are its puzzles


def default_model(experts_fp8: bool = False, dtype: str | None = None, mesh: Mesh | None = None) -> LoadedModel:
    """The model `diffjax generate` runs without `--checkpoint`: the demo model in `diffjax/assets/demo`
    (trained by diffjax on CPU on the task its task.json names; prompts are that task's puzzles)."""
    model = load_model(DEFAULT_MODEL_DIR, dtype, None, experts_fp8=experts_fp8, mesh=mesh)
    model.name = f"embedded demo model ({model.task.name})"
    return model


def checkpoint_kind(path: pathlib.Path) -> str:
    """'diffjax' (a `convert.save` folder) or 'hf' (a transformers folder), from the files present."""
    from convert.files import INDEX_FILE, PARAMS_FILE, SINGLE_FILE

    if not path.exists():
        raise CliError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CliError(f"checkpoint {path} is not a directory")
    if (path / PARAMS_FILE).is_file():
        return "diffjax"
    if (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file():
        return "hf"
    raise CliError(
        f"{path} is neither a diffjax checkpoint ({PARAMS_FILE}) nor a transformers folder "
        f"({SINGLE_FILE} or {INDEX_FILE})"
    )


def load_weights(
    checkpoint: pathlib.Path, dtype: str | None, experts_fp8: bool = False,
    progress: Callable[[str, int, int], None] | None = None, check_finite: bool = False, mesh: Mesh | None = None,
) -> tuple[Any, Any]:
    """`(config, params)` of a diffjax or transformers folder, cast to `dtype`. `experts_fp8`: the experts are
    quantized to float8_e4m3fn on the way from the host to the device (`diffjax.quantize.quantize_model`), so
    the unquantized experts never sit on the device all at once. `check_finite`: refuse NaN or inf in a
    diffjax checkpoint's weights (`convert.load`; a transformers folder is always scanned, by `load_hf`).
    `mesh`: the weights placed on it by `diffjax.sharding`'s rules, each device receiving its shards (a
    transformers folder is read shard by shard; a diffjax checkpoint is read into host memory first); fp8
    experts are quantized where their shards lie."""
    import convert
    from convert.tree import unflatten
    from diffjax.quantize import quantize_model
    from diffjax.sharding import shard_params

    kind = checkpoint_kind(checkpoint)
    if kind == "hf" and (mesh is not None or not experts_fp8):
        config, params = convert.load_hf(checkpoint, dtype, progress, mesh=mesh)  # on the mesh already
    elif kind == "diffjax" and mesh is None and not experts_fp8:
        return convert.load(checkpoint, dtype, check_finite=check_finite)
    elif kind == "diffjax":
        config, params = convert.load(checkpoint, dtype, as_numpy=True, check_finite=check_finite)
        if mesh is not None:
            params = shard_params(params, config, mesh)
    else:
        config, flat = convert.load_hf_numpy(checkpoint, dtype, progress)
        params = unflatten(flat)
    if experts_fp8:
        config, params = quantize_model(config, params)
        if mesh is not None:
            # quantize_model's output follows its inputs' shardings; its new scale leaves get the rule's own.
            params = shard_params(params, config, mesh)
    return config, params


def load_model(
    checkpoint: pathlib.Path, dtype: str | None, tokenizer_dir: pathlib.Path | None,
    progress: Callable[[str, int, int], None] | None = None, experts_fp8: bool = False, check_finite: bool = False,
    mesh: Mesh | None = None,
) -> LoadedModel:
    """Weights from a diffjax or transformers folder, its generation_config.json, and a tokenizer folder
    (or, for a folder trained on a task, the task.json naming it: the task's tokenizer).

    `experts_fp8`, `check_finite`, `mesh`: see `load_weights`."""
    import convert
    from diffjax.tasks import read_task_file
    from diffjax.tokenizer import TOKENIZER_FILE, Tokenizer

    kind = checkpoint_kind(checkpoint)
    task = read_task_file(checkpoint) if tokenizer_dir is None else None
    if task is not None:
        tokenizer = task.tokenizer
    else:
        if tokenizer_dir is not None:
            if not (tokenizer_dir / TOKENIZER_FILE).is_file():
                raise CliError(f"no {TOKENIZER_FILE} in {tokenizer_dir}, the folder --tokenizer names")
        elif not (checkpoint / TOKENIZER_FILE).is_file():
            hint = (" (diffjax checkpoints carry the tokenizer of the folder they were converted from: pass "
                    "--tokenizer HF_FOLDER)") if kind == "diffjax" else ""
            raise CliError(f"no {TOKENIZER_FILE} in {checkpoint}{hint}")
        tokenizer_dir = tokenizer_dir or checkpoint
        tokenizer = Tokenizer.from_dir(tokenizer_dir)  # before the weights: fail fast on a bad folder
    config, params = load_weights(checkpoint, dtype, experts_fp8, progress, check_finite, mesh)
    if task is not None:
        check_fits_task(config, task, str(checkpoint))
    return LoadedModel(
        config, params, tokenizer, convert.load_generation_config(checkpoint), str(checkpoint), task=task
    )


def check_fits_task(config: Config, task: Task, what: str) -> None:
    """A model for `task` reads its tokenizer's ids and was trained on its canvas length (the weights would
    run on another canvas, as a model never trained on it)."""
    if config.vocab_size < task.tokenizer.vocab_size or config.canvas_length != task.canvas_length:
        raise CliError(f"{what}: vocabulary {config.vocab_size} / canvas {config.canvas_length} do not fit task "
                       f"{task.name} (needs >= {task.tokenizer.vocab_size} / {task.canvas_length})")


# -------------------------------------------------------------------------------------- live canvas


class CanvasView:
    """`on_step` callback: keeps row 0's latest argmax draft per canvas and shows the text so far.

    On a terminal it redraws a rich Live panel; otherwise (`compact`) it prints one short line per step.
    """

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], pad_id: int, steps: int, canvases: int,
                 console: Any, compact: bool) -> None:
        self.tokenizer, self.eos_ids, self.pad_id = tokenizer, tuple(eos_ids), pad_id
        self.steps, self.canvases, self.console, self.compact = steps, canvases, console, compact
        self.drafts: dict[int, np.ndarray] = {}
        self.live: Any = None
        self.first_step_at: float | None = None
        self.calls = 0

    def text(self) -> str:
        from diffjax.tokenizer import answer_ids

        ids = np.concatenate([self.drafts[i] for i in sorted(self.drafts)]) if self.drafts else np.zeros(0, int)
        return self.tokenizer.decode(answer_ids(ids, self.eos_ids, self.pad_id))

    def __call__(self, canvas_index: Any, remaining: Any, argmax: Any) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
        self.calls += 1
        index, step = int(canvas_index), self.steps - int(remaining) + 1
        self.drafts[index] = np.asarray(argmax)[0]
        title = f"canvas {index + 1}/{self.canvases} · step {step}/{self.steps}"
        if self.compact:
            snippet = printable(self.text()).replace("\n", " ")[-60:]
            self.console.print(f"[{title}] {snippet}", markup=False, highlight=False, soft_wrap=True)
        elif self.live is not None:
            from rich.panel import Panel
            from rich.text import Text

            self.live.update(Panel(Text(printable(self.text())), title=title, border_style="cyan"))


# ------------------------------------------------------------------------------------------ commands


def _settings(args: argparse.Namespace, model: LoadedModel) -> dict[str, Any]:
    """generate() keywords: checkpoint defaults, overridden by the flags the user gave."""
    settings = dict(model.generation_defaults)
    settings.setdefault("eos_token_id", list(model.config.eos_token_id))
    settings.setdefault("pad_token_id", model.config.pad_token_id)
    flags = {
        "max_new_tokens": args.max_new_tokens, "max_denoising_steps": args.steps, "t_min": args.t_min,
        "t_max": args.t_max, "entropy_bound": args.entropy_bound, "stability_threshold": args.stability_threshold,
        "confidence_threshold": args.confidence_threshold, "statistics": args.statistics,
    }
    settings.update({k: v for k, v in flags.items() if v is not None})
    if args.no_adaptive_stop:
        if args.stability_threshold is not None or args.confidence_threshold is not None:
            raise CliError("--no-adaptive-stop turns adaptive stopping off: drop --stability-threshold and "
                           "--confidence-threshold, or it")
        settings["stability_threshold"] = None
    return settings


def _prompt_ids(args: argparse.Namespace, model: LoadedModel) -> list[int]:
    if model.task is not None:
        if args.system or args.think:
            raise CliError(f"--system and --think do not apply to a model trained on task {model.task.name!r}")
        return model.task.prompt_ids(args.prompt)
    tokenizer = model.tokenizer
    if args.raw:
        ids = tokenizer.encode(args.prompt, add_special_tokens=True)
        bos = tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]  # the model was trained with <bos> first; some tokenizer.json files omit it
        return ids
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    return tokenizer.chat_ids(messages, enable_thinking=args.think) if args.think else tokenizer.chat_ids(messages)


def compilation_cache_dir() -> pathlib.Path:
    """Where `diffjax generate` keeps compiled programs between runs: `$XDG_CACHE_HOME/diffjax/jax` (default
    `~/.cache/diffjax/jax`)."""
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "diffjax" / "jax"


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk, so a second `diffjax generate --no-live` with the same model and shapes
    skips most of its compiling (the embedded model: 22 s -> 10 s of wall time on a loaded 2-core CPU). The
    live view's loop is not kept: JAX does not store programs that call back to the host. A cache the user
    set up (JAX's `JAX_COMPILATION_CACHE_DIR`, or the config) is left as it is."""
    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR") and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(compilation_cache_dir()))


def generation_mesh(args: argparse.Namespace) -> Mesh | None:
    """`diffjax generate --mesh`'s mesh (None without the flag), after refusing the flags that cannot run on it."""
    if args.mesh is None:
        return None
    from diffjax import sharding

    if args.mesh[0] != 1:
        raise CliError(f"--mesh {','.join(map(str, args.mesh))}: diffjax generate runs one prompt, so the data axis "
                       "must be 1 (split the model over expert and model)")
    tiles = KernelTiles.parse(args.tiles or "")
    tiled = [field.name for field in dataclasses.fields(tiles)
             if field.name != "vocab" and getattr(tiles, field.name) is not None]
    refused = [flag for flag, given in (
        ("--moe", args.moe is not None), ("--experts-pretiled", args.experts_pretiled),
        ("--fused-projections", args.fused_projections), ("--unstacked-blocks", args.unstacked_blocks),
        (f"--sliding-attention {args.sliding_attention}", args.sliding_attention not in (None, "xla")),
        (f"--global-attention {args.global_attention}", args.global_attention not in (None, "xla")),
        ("--routing pallas", args.routing == "pallas"), ("--norms pallas", args.norms == "pallas"),
        ("--mlp pallas", args.mlp == "pallas"), (f"--tiles {','.join(tiled)}", bool(tiled)),
    ) if given]
    if refused:
        raise CliError(f"--mesh runs the experts expert-parallel and the rest as XLA partitions it: drop "
                       f"{', '.join(refused)} (the Pallas and cuDNN kernels, their tiles and the load-time layouts "
                       "are for one device; --statistics pallas runs on a mesh)")
    try:
        return sharding.make_mesh(*args.mesh)
    except ValueError as exc:
        raise CliError(f"--mesh: {exc}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    from rich.console import Console
    from rich.live import Live

    from diffjax.generate import generate
    from diffjax.sharding import shard_batch
    from diffjax.tokenizer import answer_ids, strip_thinking

    if not args.no_compile_cache:
        enable_compilation_cache()
    out, err = Console(), Console(stderr=True)
    mesh = generation_mesh(args)
    if args.checkpoint is None:
        given = [flag for flag, value in (("--tokenizer", args.tokenizer), ("--check-finite", args.check_finite))
                 if value]
        if given:
            raise CliError(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --checkpoint (the "
                           "embedded model has its own tokenizer and was checked when it was made)")
        model = default_model(args.experts_fp8, args.dtype, mesh)
    else:
        with err.status(f"loading {args.checkpoint}"):
            model = load_model(args.checkpoint, args.dtype, args.tokenizer, experts_fp8=args.experts_fp8,
                               check_finite=args.check_finite, mesh=mesh)
    if mesh is not None:
        model.config = model.config.replace(moe_implementation="expert_parallel")
    chosen = {field: value for field, value in (
        ("moe_implementation", args.moe), ("global_attention_implementation", args.global_attention),
        ("sliding_attention_implementation", args.sliding_attention), ("scan_unroll", args.scan_unroll),
        ("routing_implementation", args.routing), ("norm_implementation", args.norms),
        ("kernel_tiles", None if args.tiles is None else KernelTiles.parse(args.tiles)),
    ) if value is not None}
    if chosen:
        model.config = model.config.replace(**chosen)
    if args.experts_pretiled:
        require_pretiled_readers((model.config.moe_implementation,))
    model.config, model.params = arrange_for_gpu(
        model.config, model.params, experts_pretiled=args.experts_pretiled,
        projections_fused=args.fused_projections, blocks_unstacked=args.unstacked_blocks)
    if args.mlp is not None:  # after the layouts: "pallas" reads the fused one
        model.config = model.config.replace(mlp_implementation=args.mlp)
    ids = _prompt_ids(args, model)
    if model.task is None and not args.raw and getattr(model.tokenizer, "uses_fallback_template", False):
        err.print(f"note: {model.name} has no chat template of its own: the prompt is wrapped in Gemma 4's (pass "
                  "--raw to continue the text as it is)", soft_wrap=True, markup=False)
    if not ids:
        raise CliError("the prompt encodes to no tokens")
    settings = _settings(args, model)
    idle = model.config.kernel_tiles.idle(model.config, settings.get("statistics", "logits"))
    if idle:
        raise CliError(f"--tiles sets {', '.join(idle)}, whose kernel does not run here (the experts' needs --moe "
                       "pallas, experts_mgpu's --moe pallas_mgpu, the attention ones --sliding-attention / "
                       "--global-attention pallas, routing's --routing pallas, vocab's --statistics pallas)")
    eos = settings.get("eos_token_id") or []
    eos_ids = [eos] if isinstance(eos, int) else list(eos)
    pad = int(settings["pad_token_id"])
    canvas = model.config.canvas_length
    defaults = GenerationSettings()
    canvases = -(-int(settings.get("max_new_tokens", defaults.max_new_tokens)) // canvas)
    steps = int(settings.get("max_denoising_steps", defaults.max_denoising_steps))

    show_steps = not args.no_live
    if show_steps and mesh is not None and mesh.size > 1:
        err.print("note: no live view on --mesh (JAX refuses ordered host callbacks in a program over several "
                  "devices)", markup=False, highlight=False, soft_wrap=True)
        show_steps = False
    live_tty = show_steps and out.is_terminal
    view = None
    if show_steps:
        view = CanvasView(model.tokenizer, eos_ids, pad, steps, canvases, err, compact=not live_tty)
    key = jax.random.key(args.seed)
    start = time.perf_counter()

    def run() -> Any:
        prompt = jnp.asarray([ids], jnp.int32)
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            result = generate(model.params, model.config, prompt if mesh is None else shard_batch(prompt, mesh),
                              key=key, on_step=view, **settings)
            jax.block_until_ready(result.sequences)
        return result

    if live_tty:
        from rich.text import Text

        # Compiling takes seconds before the first step arrives: say so instead of showing nothing.
        waiting = Text("compiling and encoding the prompt…", style="dim")
        with Live(waiting, console=out, refresh_per_second=12, transient=True) as live:
            view.live = live
            result = run()
    else:
        result = run()
    elapsed = time.perf_counter() - start

    new = answer_ids(np.asarray(result.sequences)[0, len(ids):], eos_ids, pad)
    shown = new if args.keep_thinking or model.task is not None else strip_thinking(new, model.tokenizer)
    out.print(printable(model.tokenizer.decode(shown)), markup=False, highlight=False, soft_wrap=True)
    passes = int(np.asarray(result.decoder_passes)[0])
    rate = len(new) / elapsed if elapsed > 0 else float("inf")
    stats = (f"{len(new)} tokens in {elapsed:.2f} s ({rate:.1f} tokens/s incl. compile) · "
             f"{float(np.asarray(result.tokens_per_forward)[0]):.2f} tokens per forward (EOS included, as "
             f"transformers counts) · {passes} decoder passes")
    if view is not None and view.first_step_at is not None and view.calls > 1:
        steady = elapsed - (view.first_step_at - start)
        stats += f" · first step after {view.first_step_at - start:.2f} s (compile + prompt)"
        if steady > 0:
            stats += f", then {len(new) * (view.calls - 1) / view.calls / steady:.1f} tokens/s"
    err.print(stats, markup=False, highlight=False, soft_wrap=True)
    return 0


TRAIN_STATE_DIR = "train_state"  # the orbax checkpoints of a `diffjax train --out DIR` run, inside DIR


def _train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that define a training run: stored with its checkpoints, a resume must repeat them."""
    return {
        "task": args.task, "preset": None if args.init else args.preset, "init": str(args.init) if args.init else None,
        "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "lr": args.lr,
        "warmup_steps": args.warmup_steps, "moe": args.moe, "dtype": args.dtype, "experts_fp8": args.experts_fp8,
        # Runs from before the flag trained on "response" and stored no key: they resume with --ar-targets response.
        **({"ar_targets": args.ar_targets} if args.ar_targets != "response" else {}),
        **({"master_weights": True} if args.master_weights else {}),
    }


def cmd_train(args: argparse.Namespace) -> int:
    import jax
    from rich.console import Console

    import convert
    from diffjax.config import Config
    from diffjax.lora import DEFAULT_TARGETS, LoraConfig
    from diffjax.model import init_params, param_dtype
    from diffjax.quantize import dequantize_experts, quantize_model
    from diffjax.tasks import get_task, write_task_file
    from diffjax.train import default_warmup_steps, fit, make_optimizer

    err = Console(stderr=True)
    if args.lora_rank is None and (args.lora_alpha is not None or args.lora_targets is not None):
        raise CliError("--lora-alpha and --lora-targets need --lora-rank")
    if args.lora_rank is not None and args.init is None:
        raise CliError("--lora-rank needs --init: an adapter trains over frozen weights, and a model trained from "
                       "scratch has only random ones (drop --lora-rank to train every weight)")
    if args.experts_fp8 and args.lora_rank is None:
        raise CliError("--experts-fp8 needs --lora-rank: fp8 experts are a frozen storage format (train an adapter "
                       "over them)")
    if args.dtype is not None and args.init is None:
        raise CliError("--dtype needs --init (a model trained from scratch is float32)")
    if args.master_weights and (args.dtype in (None, "float32") or args.lora_rank is not None):
        raise CliError("--master-weights needs --dtype bfloat16 or float16 and full fine-tuning (no --lora-rank): "
                       "it keeps float32 copies of low-precision weights")
    if args.check_finite and args.init is None:
        raise CliError("--check-finite needs --init (the weights it scans)")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out} exists and is not a directory")
    state_dir = args.out / TRAIN_STATE_DIR
    if args.resume and not state_dir.is_dir():
        raise CliError(f"--resume: no training checkpoints in {state_dir}")
    if not args.resume and state_dir.exists():
        raise CliError(f"{args.out} already holds a training run: pass --resume to continue it, or choose another --out")
    if not args.resume and args.out.is_dir() and any(args.out.iterdir()):
        raise CliError(f"--out {args.out} is not empty: a new run needs a new or empty folder")
    warmup = args.warmup_steps if args.warmup_steps is not None else default_warmup_steps(args.steps)
    if warmup >= args.steps:
        raise CliError(f"--warmup-steps ({warmup}) must be below --steps ({args.steps})")
    lora = None
    if args.lora_rank is not None:
        targets = DEFAULT_TARGETS if args.lora_targets is None else tuple(args.lora_targets.split(","))
        alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
        lora = LoraConfig(rank=args.lora_rank, alpha=alpha, targets=targets)

    task = get_task(args.task)
    init_key, train_key = jax.random.split(jax.random.key(args.seed))
    if args.init is not None:
        with err.status(f"loading {args.init}"):
            config, params = load_weights(args.init, args.dtype or "float32", args.experts_fp8,
                                          check_finite=args.check_finite)
        check_fits_task(config, task, f"--init {args.init}")
        config = config.replace(moe_implementation=args.moe)
    else:
        preset = Config.demo() if args.preset == "demo" else Config.tiny()
        config = task.model_config(preset).replace(moe_implementation=args.moe)
        params = init_params(config, init_key)
        if args.experts_fp8:
            config, params = quantize_model(config, params)

    settings = _train_settings(args)
    result = fit(
        params, config, lambda index: task.batch(config, args.batch_size, index, args.seed, args.ar_targets), args.steps,
        key=train_key, optimizer=make_optimizer(args.lr, args.steps, warmup), lora=lora, checkpoint_dir=state_dir,
        checkpoint_every=args.checkpoint_every, keep=args.keep, resume=args.resume, metadata=settings,
        progress=not args.no_progress, console=err, master_weights=args.master_weights,
    )

    # The trained model as a diffjax checkpoint in --out itself (beside train_state/), so that
    # `diffjax generate --checkpoint OUT` and `diffjax convert --to-hf OUT HF` read it. Written into a staging
    # folder first (convert.save is atomic), then moved in file by file, the weights last.
    staging = args.out / ".export"
    generation = {"max_new_tokens": task.num_canvases(config) * config.canvas_length}
    trained, export_config = result.params, config
    if config.expert_quantization != "none":  # checkpoints hold unquantized weights: the fp8 values, widened
        trained = dequantize_experts(trained, param_dtype(trained))
        export_config = config.replace(expert_quantization="none")
    convert.save(trained, export_config, staging, generation, overwrite=True)
    write_task_file(staging, task)
    for name in [*sorted(p.name for p in staging.iterdir() if p.name != convert.PARAMS_FILE), convert.PARAMS_FILE]:
        (staging / name).replace(args.out / name)
    staging.rmdir()

    if result.losses:
        rate = "" if result.tokens_per_second is None else f", {result.tokens_per_second:,.0f} tokens/s"
        err.print(f"step {result.step}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over "
                  f"{len(result.losses)} steps{rate}", highlight=False)
    err.print(f"wrote {args.out} (generate --checkpoint {args.out}; training state in {state_dir})",
              highlight=False, soft_wrap=True)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from convert.__main__ import main as convert_main

    argv = [str(args.src), str(args.dst), "--max-shard-size", str(args.max_shard_size)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    argv += ["--overwrite"] * args.overwrite + ["--to-hf"] * args.to_hf + ["--quiet"] * args.quiet
    code = convert_main(argv)
    return code if code in (0, 130) else EXIT_USAGE  # 130: interrupted, as for every other command


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from diffjax import bench

    # Logs and tables often go to files (the GPU runs' logs): there rich's 80 columns would cut a table's cells
    # to "…" and wrap each point's JSON line.
    out = Console(width=None if sys.stdout.isatty() else 240)
    err = Console(stderr=True, soft_wrap=True)

    def log(message: str) -> None:
        err.print(f"[dim]{message}[/]")

    try:
        if args.full_size:
            settings = bench.FullSizeSettings(
                layers=args.layers, batches=tuple(args.batch or (1,)), prompts=tuple(args.prompt or (1024,)),
                new_tokens=args.new_tokens or 256, steps=args.steps or 16, repeats=args.repeats, seed=args.seed,
                force=args.force, generate=not args.no_generate, transformers=args.with_transformers,
                transformers_compile=not args.no_compile, moe_implementations=tuple(args.moe or ("grouped",)),
                statistics=tuple(args.statistics or ("logits",)),
                experts_fp8=args.experts_fp8, experts_pretiled=args.experts_pretiled,
                profile_dir=None if args.profile is None else str(args.profile),
                global_attention=args.global_attention or "xla",
                sliding_attention=tuple(args.sliding_attention or ("xla",)),
                scan_unroll=tuple(args.scan_unroll or (1,)),
                projections=tuple(args.projections or ("separate",)),
                blocks=tuple(args.blocks or ("stacked",)),
                routing=tuple(args.routing or ("xla",)),
                norms=tuple(args.norms or ("xla",)),
                mlp=tuple(args.mlp or ("xla",)),
                xla_options=tuple(args.xla_options or ("",)),
                tiles=tuple(args.tiles or ("",)), decoder_only=args.decoder_only,
            )
            if args.compiled_for:
                result = bench.compiled_full_size(settings, args.compiled_for, log)
            else:
                result = bench.run_full_size(settings, log)
        else:
            for flag in ("experts_fp8", "experts_pretiled"):
                if getattr(args, flag):
                    raise CliError(f"--{flag.replace('_', '-')} needs --full-size (the comparison runs identical "
                                   "weights on both sides)")
            for flag in ("global_attention", "sliding_attention", "scan_unroll", "projections", "blocks",
                         "routing", "norms", "mlp", "xla_options", "tiles", "profile", "compiled_for",
                         "decoder_only"):
                if getattr(args, flag):
                    raise CliError(f"--{flag.replace('_', '-')} needs --full-size (a GPU run)")
            defaults = bench.BenchSettings()
            for name in ("batch", "prompt", "moe", "statistics"):
                if len(getattr(args, name) or ()) > 1:
                    raise CliError(f"--{name} takes one value without --full-size")
            chosen = {
                "hidden": args.hidden, "layers": args.layers, "experts": args.experts, "top_k": args.top_k,
                "vocab": args.vocab, "canvas": args.canvas, "steps": args.steps, "batch": args.batch and args.batch[0],
                "prompt": args.prompt and args.prompt[0], "new_tokens": args.new_tokens, "threads": args.threads,
                "moe_implementation": args.moe and args.moe[0], "statistics": args.statistics and args.statistics[0],
            }
            result = bench.run_comparison(dataclasses.replace(
                defaults, repeats=args.repeats, seed=args.seed, transformers=not args.no_transformers,
                **{k: v for k, v in chosen.items() if v is not None},
            ), log)
    except bench.BenchError as exc:
        raise CliError(str(exc)) from None
    bench.render(result, out)
    if args.json:
        bench.write_json(result, args.json)
        err.print(f"wrote {args.json}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from diffjax.config import FULL, Config
    from diffjax.model import count_params, param_shapes

    if args.checkpoint is not None:
        from convert.hf import read_config

        checkpoint_kind(args.checkpoint)
        config, source = read_config(args.checkpoint), str(args.checkpoint)
    elif args.preset == "tiny":
        config, source = Config.tiny(), "Config.tiny()"
    elif args.preset == "demo":
        config, source = Config.demo(), "Config.demo() (the architecture `diffjax train --preset demo` starts from)"
    elif args.preset == "default":
        config, source = default_model().config, "embedded default model"
    else:
        config, source = Config.diffusiongemma_26b_a4b(), "Config.diffusiongemma_26b_a4b() (released 26B-A4B)"
    total = count_params(config)
    experts = sum(
        int(np.prod(leaf.shape)) for path, leaf in _leaves(param_shapes(config)) if "experts" in path
    )
    # A token runs top_k of num_experts experts; every other weight it touches in full.
    active = total - experts + experts * config.top_k_experts // config.num_experts
    # `--experts-fp8`: e4m3 expert weights plus their float32 per-column scales, the rest bf16.
    fp8_experts = config.replace(expert_quantization="fp8")
    fp8_bytes = sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
                    for _, leaf in _leaves(param_shapes(fp8_experts, jnp.bfloat16)))
    if args.json:
        print(json.dumps({"source": source, "config": _config_dict(config), "params": total,
                          "active_params_per_token": active, "bf16_bytes": 2 * total,
                          "bf16_fp8_experts_bytes": fp8_bytes}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=source, show_header=False)
    for name, value in _config_dict(config).items():
        if name == "layer_types":
            value = "".join("F" if t == FULL else "S" for t in value) + "  (S sliding, F full)"
        table.add_row(name, str(value))
    table.add_row("parameters", f"{total:,} ({_count(total)})")
    table.add_row("active per token", f"{active:,} ({_count(active)})")
    table.add_row("bf16 size", _bytes(2 * total))
    table.add_row("with fp8 experts", f"{_bytes(fp8_bytes)} (--experts-fp8)")
    Console().print(table)
    return 0


def _count(n: int) -> str:
    """4.0 B, 281.8 K: the unit that keeps a small model's figures readable."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    import jax

    return [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _config_dict(config: Any) -> dict[str, Any]:
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else (
            list(value) if isinstance(value, tuple) else value)
    return out


# ------------------------------------------------------------------------------------------- parsing


def _number_type(convert: Callable[[str], Any], kind: str, accept: Callable[[Any], bool], bound: str
                 ) -> Callable[[str], Any]:
    """An argparse `type` that converts with `convert` and refuses what `accept` rejects, naming `bound`."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {kind} {bound}, got {value}")
        return value

    return parse


_positive_int = _number_type(int, "an integer", lambda v: v > 0, "> 0")
_nonnegative_int = _number_type(int, "an integer", lambda v: v >= 0, ">= 0")
_positive_float = _number_type(float, "a finite number", lambda v: math.isfinite(v) and v > 0, "> 0")
_nonnegative_float = _number_type(float, "a finite number", lambda v: math.isfinite(v) and v >= 0, ">= 0")
# jax.random.key takes a signed 64-bit seed.
_seed = _number_type(int, "an integer", lambda v: 0 <= v < 2**63, "in [0, 2**63)")


def _mesh_shape(text: str) -> tuple[int, int, int]:
    """`--mesh DATA,EXPERT,MODEL`: three positive integers."""
    sizes = text.split(",")
    if len(sizes) != 3 or not all(size.strip().isdigit() and int(size) > 0 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected DATA,EXPERT,MODEL (three positive integers), got {text!r}")
    return int(sizes[0]), int(sizes[1]), int(sizes[2])


def _add_implementation_flags(parser: argparse.ArgumentParser, prefix: str = "", several: bool = False) -> None:
    """`--global-attention`, `--sliding-attention`, `--routing`, `--norms`, `--mlp`, `--tiles` and
    `--scan-unroll`: `Config` fields that pick how, not what, the model computes (besides `--moe`). `several`:
    all but the first take one or more values (each timed)."""
    nargs = "+" if several else None
    each = "; one or more, each timed" if several else ""
    parser.add_argument("--global-attention", choices=GLOBAL_ATTENTION_IMPLEMENTATIONS,
                        help=f"{prefix}the decoder's global layers: xla (default) or the split-K Pallas kernel (GPU)")
    parser.add_argument("--sliding-attention", choices=SLIDING_ATTENTION_IMPLEMENTATIONS, nargs=nargs,
                        help=f"{prefix}the decoder's sliding layers: xla (default), cuDNN fused attention (GPU, "
                             f"bf16) or the split-K Pallas kernel (GPU){each}")
    parser.add_argument("--routing", choices=ROUTING_IMPLEMENTATIONS, nargs=nargs,
                        help=f"{prefix}how MoE layers pick and group their experts: xla (default) or the two Pallas "
                             f"kernels of diffjax.kernels.routing (GPU; the layout one for --moe pallas){each}")
    parser.add_argument("--norms", choices=NORM_IMPLEMENTATIONS, nargs=nargs,
                        help=f"{prefix}each layer's norms between attention and its feed-forward parts: xla "
                             f"(default) or one Pallas kernel (GPU){each}")
    parser.add_argument("--mlp", choices=MLP_IMPLEMENTATIONS, nargs=nargs,
                        help=f"{prefix}each layer's dense MLP: xla (default, three launches) or programs of the "
                             f"Pallas expert kernels (GPU; needs --moe pallas and fused projections){each}")
    parser.add_argument("--tiles", nargs=nargs, metavar="TILES",
                        help=f"{prefix}the Pallas kernels' tiles: comma-separated kernel.setting=value (e.g. "
                             f"sliding_attention.block_k=64,routing.project=false; kernels: experts, experts_mgpu, "
                             f"sliding_attention, global_attention, routing, vocab; '' for the defaults){each}")
    parser.add_argument("--scan-unroll", type=_positive_int, nargs=nargs,
                        help=f"{prefix}layer blocks per iteration of the scan over blocks (default 1; the block "
                             f"count: no loop, static weight slices, longer compile){each}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffjax", description="DiffusionGemma in JAX: generate, train, convert, bench, info.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    dtypes = ["bfloat16", "float32", "float16"]

    g = sub.add_parser("generate", help="generate text, showing the canvas as it is denoised")
    g.add_argument("prompt", help="the user message (with --raw: the raw text to continue)")
    g.add_argument("--checkpoint", type=pathlib.Path,
                   help="diffjax checkpoint or transformers folder (default: the embedded default model)")
    g.add_argument("--tokenizer", type=pathlib.Path,
                   help="folder with tokenizer.json (+ chat template) if not in the checkpoint")
    g.add_argument("--dtype", choices=dtypes, help="cast the weights (default: as stored)")
    g.add_argument("--check-finite", action="store_true",
                   help="refuse a diffjax checkpoint with NaN or inf weights (reads every weight once more, "
                        "about a second per 10 GB; transformers folders are always checked)")
    g.add_argument("--experts-fp8", action="store_true",
                   help="quantize the experts to float8_e4m3fn (per-column scales) when loading: about half the "
                        "memory of bf16")
    g.add_argument("--experts-pretiled", action="store_true",
                   help="with --moe pallas or pallas_mgpu: lay the experts out tile by tile for the Pallas kernels "
                        "when loading")
    g.add_argument("--fused-projections", action="store_true",
                   help="fuse q/k/v and gate/up into one kernel each when loading (same maths; with "
                        "--unstacked-blocks, or --scan-unroll at the block count, a GPU step reads them in place "
                        "instead of copying them out of their stacks)")
    g.add_argument("--unstacked-blocks", action="store_true",
                   help="give each layer block's weights arrays of their own when loading (same maths; no scan over "
                        "blocks, so any GPU matmul reads them in place)")
    g.add_argument("--max-new-tokens", type=_positive_int, help="rounded up to whole canvases")
    g.add_argument("--steps", type=_positive_int, help="max denoising steps per canvas (default 48)")
    g.add_argument("--t-min", type=_nonnegative_float, help="final temperature (default 0.4)")
    g.add_argument("--t-max", type=_positive_float, help="initial temperature (default 0.8)")
    g.add_argument("--entropy-bound", type=_positive_float, help="entropy-bound sampler budget (default 0.1)")
    g.add_argument("--stability-threshold", type=_nonnegative_int, help="adaptive stop: stable steps (default 1)")
    g.add_argument("--confidence-threshold", type=_positive_float,
                   help="adaptive stop: mean entropy below this (default 0.005)")
    g.add_argument("--no-adaptive-stop", action="store_true", help="run every denoising step")
    g.add_argument("--statistics", choices=STATISTICS,
                   help="logits (default): float32 logits per step; pallas: LM head, entropy and draw fused in one "
                        "vocabulary pass (GPU kernel; interpreted, slowly, on a CPU); xla: its plain-JAX twin")
    g.add_argument("--moe", choices=MOE_IMPLEMENTATIONS,
                   help="expert computation (default: the checkpoint's, grouped): on a GPU, pallas")
    _add_implementation_flags(g)
    g.add_argument("--mesh", type=_mesh_shape, metavar="1,EXPERT,MODEL",
                   help="run on a (data, expert, model) mesh of all devices (diffjax.sharding.make_mesh; e.g. 1,8,1 "
                        "on 8 GPUs): each device receives only its shards (a transformers folder is read shard by "
                        "shard, a diffjax checkpoint through host memory) and the experts run expert-parallel. "
                        "data must be 1 (one prompt); XLA attention, routing and norms (--statistics pallas works)")
    g.add_argument("--seed", type=_seed, default=0)
    g.add_argument("--no-live", action="store_true", help="no per-step view (also skips the host callback)")
    g.add_argument("--no-compile-cache", action="store_true",
                   help="compile from scratch, keeping nothing on disk (default: compiled programs are kept in "
                        "$XDG_CACHE_HOME/diffjax/jax, or JAX_COMPILATION_CACHE_DIR if set, for the next run; "
                        "with --no-live only, as the live view calls back to the host)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="raw", action="store_false", help="wrap the prompt in the chat template (default)")
    mode.add_argument("--raw", dest="raw", action="store_true", help="encode the prompt as is (<bos> + text)")
    g.add_argument("--system", help="system message (chat mode)")
    g.add_argument("--think", action="store_true", help="enable_thinking=True in the chat template")
    g.add_argument("--keep-thinking", action="store_true", help="print the thought channel too")
    g.set_defaults(func=cmd_generate, raw=False)

    c = sub.add_parser("convert", help="transformers folder -> diffjax checkpoint (or back with --to-hf)")
    c.add_argument("src", type=pathlib.Path)
    c.add_argument("dst", type=pathlib.Path)
    c.add_argument("--dtype", choices=dtypes, help="cast every weight (default: keep the stored dtype)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is an empty folder or a checkpoint (a folder with other files is refused)")
    c.add_argument("--to-hf", action="store_true", help="SRC is a diffjax checkpoint, DST a transformers folder")
    c.add_argument("--max-shard-size", default="5GB", type=shard_size,
                   help="shard size for --to-hf: bytes or a number with a unit, e.g. 500MB, 2GiB (default 5GB)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="train (or LoRA fine-tune) a model on a task; resumable")
    from diffjax.tasks import TASK_NAMES

    t.add_argument("--task", required=True, choices=TASK_NAMES, help="the task to train on")
    start = t.add_mutually_exclusive_group()
    start.add_argument("--preset", choices=("demo", "tiny"), default="demo",
                       help="architecture of a model trained from scratch (default demo)")
    start.add_argument("--init", type=pathlib.Path, help="start from this diffjax checkpoint or transformers folder")
    t.add_argument("--steps", type=_positive_int, required=True, help="optimiser steps in total")
    t.add_argument("--batch-size", type=_positive_int, default=32, help="examples per step (default 32)")
    t.add_argument("--out", type=pathlib.Path, required=True,
                   help="run folder: the trained checkpoint, and the training state in OUT/train_state")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    t.add_argument("--warmup-steps", type=_nonnegative_int, help="linear warmup (default steps/10), then cosine")
    t.add_argument("--seed", type=_seed, default=0, help="init, data and noise seed (default 0)")
    t.add_argument("--lora-rank", type=_positive_int, help="train a LoRA adapter of this rank instead of all weights")
    t.add_argument("--lora-alpha", type=_positive_float, help="LoRA scale alpha (default 2 * rank)")
    t.add_argument("--lora-targets", help="comma-separated modules, e.g. self_attn/q_proj,mlp/up_proj (default: "
                   "attention q/k/v/o and the dense MLP gate/up/down)")
    t.add_argument("--checkpoint-every", type=_positive_int, default=100, help="save every K steps (default 100)")
    t.add_argument("--keep", type=_positive_int, default=3, help="training checkpoints kept (default 3)")
    t.add_argument("--dtype", choices=dtypes, help="--init: cast the weights (default float32; bfloat16 halves the "
                   "memory of a large base)")
    t.add_argument("--master-weights", action="store_true",
                   help="with --dtype bfloat16/float16, full fine-tuning: train float32 copies of the weights (the "
                        "forward runs in --dtype), so updates below a bf16 rounding step add up; the export is --dtype")
    t.add_argument("--check-finite", action="store_true",
                   help="--init: refuse a diffjax checkpoint with NaN or inf weights (reads every weight once more, "
                        "about a second per 10 GB; transformers folders are always checked)")
    t.add_argument("--experts-fp8", action="store_true",
                   help="with --lora-rank: float8_e4m3fn experts under the adapter (QLoRA-style; about half the "
                        "memory); the exported model has them widened back")
    t.add_argument("--moe", choices=("grouped", "dense"), default="dense",
                   help="expert computation during training (default dense: every expert, vmapped per example)")
    t.add_argument("--ar-targets", choices=AR_TARGETS, default=DEFAULT_AR_TARGETS,
                   help="what the encoder's AR co-loss scores: prompt + every valid canvas with a per-example mean "
                        "as Google's SFT (default), prompt + response as TRL's example, or the response only (runs "
                        "from before 2026-11-28 trained so: resume them with --ar-targets response)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="time diffjax against transformers (same weights, fixed steps)")
    b.add_argument("--hidden", type=_positive_int, help="hidden size (default 256)")
    b.add_argument("--layers", type=_positive_int, help="layers (default 4; with --full-size: of 30)")
    b.add_argument("--experts", type=_positive_int, help="experts (default 8)")
    b.add_argument("--top-k", type=_positive_int, help="experts per token (default 2)")
    b.add_argument("--vocab", type=_positive_int, help="vocabulary (default 4096)")
    b.add_argument("--canvas", type=_positive_int, help="canvas length (default 64)")
    b.add_argument("--steps", type=_positive_int, help="fixed denoising steps per canvas (default 12; full size 16)")
    b.add_argument("--batch", type=_positive_int, nargs="+",
                   help="rows (default 2; --full-size: one or more, default 1)")
    b.add_argument("--prompt", type=_positive_int, nargs="+",
                   help="prompt tokens (default 32; --full-size: one or more, default 1024)")
    b.add_argument("--new-tokens", type=_positive_int, help="generated tokens (default 128; full size 256)")
    b.add_argument("--repeats", type=_positive_int, default=3, help="timed warm calls, the best is reported (default 3)")
    b.add_argument("--seed", type=_seed, default=0)
    b.add_argument("--threads", type=_positive_int, help="torch threads (default: all cores)")
    b.add_argument("--moe", choices=MOE_IMPLEMENTATIONS, nargs="+",
                   help="our expert computation (default grouped): routed pairs via ragged_dot, every expert on "
                        "every token, or the Pallas grouped-matmul kernel; --full-size: one or more, each timed")
    b.add_argument("--statistics", choices=STATISTICS, nargs="+",
                   help="generate's statistics path (default logits): float32 logits, or the fused vocabulary "
                        "pass (pallas; xla is its plain-JAX twin); --full-size: one or more, each timed")
    b.add_argument("--no-transformers", action="store_true", help="time diffjax only")
    b.add_argument("--full-size", action="store_true", help="released 26B-A4B shapes, random bf16, on the GPU")
    b.add_argument("--with-transformers", action="store_true",
                   help="--full-size: also time transformers in this process (pick --layers so both fit; on a GPU "
                        "cap JAX's preallocation, e.g. XLA_PYTHON_CLIENT_MEM_FRACTION=0.5)")
    b.add_argument("--no-compile", action="store_true",
                   help="--with-transformers: eager transformers (default: static cache + torch.compile)")
    b.add_argument("--no-generate", action="store_true",
                   help="--full-size: time the decoder step and encoder canvas only, not the whole loop")
    b.add_argument("--decoder-only", action="store_true",
                   help="--full-size: time the decoder step alone on a cache of random keys and values (no prefill "
                        "or encoder compiled: for tile and option sweeps)")
    b.add_argument("--experts-fp8", action="store_true",
                   help="--full-size: experts in float8_e4m3fn with float32 per-column scales (the floor counts "
                        "their bytes)")
    b.add_argument("--experts-pretiled", action="store_true",
                   help="--full-size with --moe pallas / pallas_mgpu only: the experts laid out tile by tile for the "
                        "kernels")
    b.add_argument("--projections", nargs="+", choices=PROJECTION_LAYOUTS,
                   help="--full-size: dense projection layouts to time, e.g. separate fused (default separate)")
    b.add_argument("--blocks", nargs="+", choices=BLOCK_LAYOUTS,
                   help="--full-size: block layouts to time, e.g. stacked unstacked (default stacked; both at once "
                        "hold the model twice)")
    b.add_argument("--xla-options", nargs="+", metavar="OPTIONS",
                   help="--full-size: XLA compile options of the decoder step and encoder canvas, each value one "
                        "variant timed on the same weights: comma-separated name=value (e.g. "
                        "xla_gpu_enable_triton_gemm=false; a list value keeps its commas), '' for the defaults")
    b.add_argument("--compiled-for", metavar="GPU",
                   help="--full-size: compile each decoder step here for this GPU (h200, or a GpuTargetConfigProto "
                        "file) and count its launches and copies instead of timing it; needs JAX's CUDA plugin "
                        "(pip install \"jax[cuda13]\"), not a GPU")
    b.add_argument("--profile", type=pathlib.Path, metavar="DIR",
                   help="--full-size: profile one more decoder step per point (kernels summed by name; traces in DIR)")
    _add_implementation_flags(b, "--full-size: ", several=True)
    b.add_argument("--force", action="store_true", help="--full-size on a CPU backend anyway")
    b.add_argument("--json", type=output_file, help="also write the results as JSON")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="config and parameter count of a preset or checkpoint")
    i.add_argument("--checkpoint", type=pathlib.Path, help="read this folder's config.json")
    i.add_argument("--preset", choices=["26b", "tiny", "demo", "default"], default="26b",
                   help="without --checkpoint: 26b (released model, default), tiny, demo (`train --preset demo`'s "
                        "architecture), default (the embedded model: demo trained on its task)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `diffjax` console script; returns the exit status."""
    from convert import CheckpointError
    from diffjax.tokenizer import TokenizerError

    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (CliError, CheckpointError, TokenizerError, OSError, ValueError) as exc:
        # ValueError: generate()'s and Config's own validation (prompt too long, bad temperature, ...);
        # OSError: a file or folder that cannot be read or written (its message names the path).
        print(f"diffjax: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("diffjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
