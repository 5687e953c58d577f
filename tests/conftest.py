"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    # fake devices rendezvous in every collective: on a loaded machine a starved device thread
    # must not hit XLA's default 40 s abort
    + " --xla_cpu_collective_call_terminate_timeout_seconds=300"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
