"""Fixtures of the end-to-end tests: a quick toy world (cached across sessions under .cache/)."""
import pytest

from tests.support.pipeline import quick_toy_dir


@pytest.fixture(scope="module")
def toy_dir():
    return quick_toy_dir()
