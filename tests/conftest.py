"""Shared fixtures: each room's fixture module is registered here."""
import os

# Sharding tests need 8 CPU devices; XLA reads this once, before jax is first imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins: list[str] = ["tests.model_fixtures", "tests.lean_harness.fixtures", "tests.rollout_fixtures"]
