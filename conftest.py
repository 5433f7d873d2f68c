"""Root conftest: the contract suite lives in the package, so ask pytest to rewrite its asserts."""

import pytest

pytest.register_assert_rewrite("rlm_sandbox.testing")
