"""Prefect's test harness: one temporary Prefect server for the whole session, only for tests that ask.

The fixture also exports the server's URL, so `semiprune` commands run as subprocesses report to the
same server instead of each starting a temporary one. Unit tests never request it.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url  # for subprocesses
        try:
            yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)
