import os

# Tests run on the CPU (optax's Adam is not clean under strict dtype promotion, so it stays off).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# In-process runs leave JAX's persistent compilation cache off (it is process-wide state); the test
# of the cache turns it on in its own subprocesses.
os.environ.setdefault("SAEJAX_COMPILE_CACHE", "0")
