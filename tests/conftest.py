import os
import shutil
import sys
import tempfile

# Tests import shared references (e.g. `ellipses`) from this folder.
sys.path.insert(0, os.path.dirname(__file__))

# One persistent XLA compilation cache for the whole session, in this process and every `train.py`,
# `evaluate` and notebook it starts: most of the suite's minutes were processes compiling the smoke preset's
# programs again (the resume test alone compiled the same task step three times). Every program is cached,
# however quick to compile, since the many small ones add up. A cache the caller chose is left as it is.
# The key holds XLA_FLAGS, the devices and jaxlib's version, so a hit is the same executable. Set here,
# before any test imports jax, which reads these at import.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="allpet_tests_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
