"""Fixtures the decode-level suites share (test_blob_validation, test_hostile_blobs, test_peft_folder_validation,
test_served_tasks, test_embed_adapters): the default backbone's fingerprint, head kind, one valid blob."""
from __future__ import annotations

import pytest

from tests.factories import make_blob


@pytest.fixture(scope="module")
def fp(minilm):
    return minilm.fingerprint


@pytest.fixture(scope="module")
def head(minilm):
    return minilm.family.head_kind


@pytest.fixture(scope="module")
def blob(fp):
    return make_blob(fp, 4, seed=1)
