"""Helpers shared by the test folders (unit/, integration/, sandbox/): test doubles (`fakes`), the tiny
Qwen3 (`tiny`), the in-process learner harness (`trainer`), `rankguard up` as a subprocess (`pipeline`).
Fixtures built on them live in tests/conftest.py (every folder) and tests/integration/conftest.py."""
