import pytest

# Assertions in shared helpers report their values as they would inline in a test.
pytest.register_assert_rewrite(
    "tests.helpers",
    "tests.ingest_checks",
    "tests.backends.scenarios",
    "tests.backends.conformance",
    "tests.chaos.checks",
)
