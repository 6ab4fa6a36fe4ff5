import os
import sys

# Tests compile many small programs: LLVM's expensive passes cost more than they save here.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
sys.path.insert(0, os.path.dirname(__file__))
