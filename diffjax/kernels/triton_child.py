"""Triton's compiler for `diffjax.kernels.codegen`, run as a child process: `python triton_child.py < request`.

Why a separate process: Triton's compiler is a native library with its own LLVM and MLIR, and jaxlib carries
another; the child keeps Triton's passes and their global state out of the process that compiles with XLA.
(It was first written for a test-worker crash in XLA's CPU compiler, which turned out to be something else:
the worker running out of memory maps, `tests/conftest.py`.) This file imports nothing from jax or diffjax,
so the child loads Triton alone, and it is run by path, not as a package module.

Request (JSON on stdin): {"mode": "compile" | "make_ttir", "kernels": [{"name", "ttir", "num_warps",
"num_stages"}, ...]}. Reply (JSON on stdout): one entry per kernel, for "compile" {"ptx", "sass", "usage",
"shared"} (the sm_90a PTX, SASS, cuobjdump's resource usage and the dynamic shared memory in bytes), for
"make_ttir" {"ttir"} (the Triton-IR stage's output); or {"error": ...} when Triton cannot be imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SM90 = ("cuda", 90, 32)


def make_ttir(ttir: str, options: dict[str, Any]) -> str:
    """The Triton-IR stage (canonicalise, combine `acc + dot` into the dot's accumulator, CSE, ...) run on
    `ttir`, as XLA runs it before the GPU stages; `triton.compile` of an IR file starts after it."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget(*SM90)
    backend = make_backend(target)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ttir"
        path.write_text(ttir, encoding="utf-8")
        module = ir.parse_mlir_module(str(path), context)
    module.context = context
    backend.make_ttir(module, {}, backend.parse_options(options), target.arch)
    return str(module)


def compile_sm90(name: str, ttir: str, options: dict[str, Any]) -> dict[str, Any]:
    """PTX, SASS, resource usage and shared memory of `ttir` compiled for sm_90a through every stage."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.ttir"
        path.write_text(make_ttir(ttir, options), encoding="utf-8")
        compiled = triton.compile(str(path), target=GPUTarget(*SM90), options=options)
        cubin = Path(tmp) / f"{name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage, sass = (subprocess.run([triton.knobs.nvidia.cuobjdump.path, flag, str(cubin)], capture_output=True,
                                      text=True, check=True).stdout
                       for flag in ("--dump-resource-usage", "--dump-sass"))
    return {"ptx": compiled.asm["ptx"], "sass": sass, "usage": usage, "shared": int(compiled.metadata.shared)}


def main() -> int:
    request = json.load(sys.stdin)
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        json.dump({"error": str(exc)}, sys.stdout)
        return 0
    replies = []
    for kernel in request["kernels"]:
        # XLA fuses multiply-adds in Triton kernels; saying so also silences Triton 3.9's default warning.
        options = {"num_warps": kernel["num_warps"], "num_stages": kernel["num_stages"], "enable_fp_fusion": True}
        if request["mode"] == "make_ttir":
            replies.append({"ttir": make_ttir(kernel["ttir"], options)})
        else:
            replies.append(compile_sm90(kernel["name"], kernel["ttir"], options))
    json.dump(replies, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
