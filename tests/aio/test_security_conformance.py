"""Logging, TLS and secrets, run a second time on the async API.

The test functions of tests/conformance/test_logging.py, test_tls.py and
test_secret_output.py are imported, not copied; their ``dcoord_connect`` makes
dcoord.aio clients seen through the adapter (tests/aio/adapter.py). Nothing is left
out; test_secret_output's ``dcoord`` command runs are the sync CLI's, as in the sync run.
"""

from __future__ import annotations

from tests.conformance import test_logging, test_secret_output, test_tls
from tests.conformance.test_logging import captured  # noqa: F401  (fixtures the tests take)
from tests.conformance.test_secret_output import log_text  # noqa: F401

globals().update(
    {
        name: value
        for module in (test_logging, test_tls, test_secret_output)
        for name, value in vars(module).items()
        if name.startswith("test_") and callable(value)
    }
)
