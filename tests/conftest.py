import os
import sys

# Tests compile many small programs: LLVM's expensive passes cost more than they save here. And bf16 results
# rounded after every operation, as transformers rounds them: with excess precision allowed, XLA on a CPU keeps
# some bf16 intermediates in float32 depending on how it fuses, so two forms of one computation (a kernel and
# its twin, two expert paths) round differently where their fusions differ, and a bf16 near-tie in a router
# flips one way in one and the other way in the other.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_allow_excess_precision=false")
sys.path.insert(0, os.path.dirname(__file__))


import jax
import pytest

# `diffjax generate` points JAX's persistent compilation cache at a folder (`cli.enable_compilation_cache`); the
# CLI tests run it in-process, which would persist every later test's programs in their worker. Off here.
jax.config.update("jax_enable_compilation_cache", False)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Each XLA CPU executable keeps memory maps of its
    code; a test worker that compiles the whole suite's programs reached ~62,600 maps against Linux's default
    `vm.max_map_count` of 65,530, and the next compile segfaulted inside LLVM (seen in 3 of 6 full runs)."""
    yield
    jax.clear_caches()


@pytest.fixture
def kernels_compiled():
    """The Pallas kernels compiled for the GPU, not interpreted, on this CPU host: for the CUDA-lowering tests
    (`diffjax.kernels.compiling_for_gpu`, which also drops traces made for the interpreter)."""
    from diffjax import kernels

    with kernels.compiling_for_gpu():
        yield
