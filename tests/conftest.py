"""Test-wide setup: 8 fake CPU devices for mesh tests, quiet logs, full-precision float32 matmuls.

XLA_FLAGS must be set before jax is first imported, so it is set here for the whole session.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax

jax.config.update("jax_default_matmul_precision", "highest")
