import atexit
import os
import shutil
import tempfile

# Tests run on the CPU (optax's Adam is not clean under strict dtype promotion, so it stays off).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The runner's own compilation cache (under its cache dir) stays off in-process: it is process-wide
# state; the test of that cache turns it on in its own subprocesses.
os.environ.setdefault("SAEJAX_COMPILE_CACHE", "0")
# Instead, every process of a test worker (the worker and the runners it starts, one after another)
# shares one JAX persistent compilation cache for this session, as a user's re-runs share the
# runner's: repeated runs of the same experiment then compile nothing twice. One directory per
# worker, so no two processes write an entry at the same time; removed when the worker exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _xla = tempfile.mkdtemp(prefix=f"saejax-tests-xla-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, _xla, ignore_errors=True)
