"""Fixtures shared by the trainer tests in this directory."""

from __future__ import annotations

import pytest
from local_setup import build_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny demo assets (tokenizer, 2-layer student, data; ``local_setup.build_assets``), one set per module."""
    return build_assets(str(tmp_path_factory.mktemp("gad_assets")))
