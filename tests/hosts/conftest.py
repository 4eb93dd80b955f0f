"""Fixtures shared by the host test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def trainer_reference(tmp_path_factory):
    """The conformance scenario through the transformers Trainer: the report every host's run is compared with."""
    from conformance import trainer_report

    return trainer_report(tmp_path_factory.mktemp("trainer_conformance"))
