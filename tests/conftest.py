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


@pytest.fixture(autouse=True, scope="session")
def _shared_compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the run, shared by the xdist workers: many tests compile the same
    programs (the same tiny model's loop, another module after `_release_compiled_programs`, the other worker),
    and loading one is faster than compiling it again (test_generate.py: 3:22 -> 2:54 under -n 2). A size
    limit turns on JAX's file lock, so workers never read an entry while another writes it. Set before the
    CLI tests run `diffjax generate`, whose `cli.enable_compilation_cache` then leaves it as it is."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    jax.config.update("jax_compilation_cache_dir", str(shared / "jax_compilation_cache"))
    jax.config.update("jax_compilation_cache_max_size", 8 << 30)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield


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
