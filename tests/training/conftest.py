"""Fixtures of the training tests."""

import os

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh corpus and tokenizer cache for the module's runs (the workers inherit it)."""
    path = tmp_path_factory.mktemp("corpus_cache")
    os.environ["MEGATRON_FOX_CACHE"] = str(path)
    yield path
    os.environ.pop("MEGATRON_FOX_CACHE", None)
