import os

# Tests run on the CPU (optax's Adam is not clean under strict dtype promotion, so it stays off).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
