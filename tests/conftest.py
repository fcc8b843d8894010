"""Shared fixtures: paths to the real LoveDA sample and a small synthetic dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOVEDA_SAMPLE = REPO.parent / "shared" / "data" / "loveda-sample"


def _loveda_or_skip() -> Path:
    if not (LOVEDA_SAMPLE / "images").is_dir():
        pytest.skip(
            f"real LoveDA sample not found at {LOVEDA_SAMPLE}: it ships beside the clone in CI "
            "(../shared/data/loveda-sample); a user's clone does not have it"
        )
    return LOVEDA_SAMPLE


@pytest.fixture(scope="session")
def loveda_sample() -> Path:
    """Folder with images/ and masks/ of three real 1024x1024 LoveDA tiles (skip when absent)."""
    return _loveda_or_skip()
