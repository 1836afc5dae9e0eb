"""schemathesis against the running suite's own /openapi.json: every operation, with
generated valid and invalid input, answers without a 5xx, and every error is an RFC 9457
problem+json without a stack trace. Bounded: a few examples per operation, derandomised.

Logout is left out (it would revoke the token the other cases use); it has its own tests
in tests/integration/test_http_hardening.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from tests.e2e.conftest import Suite, running_suite
from tests.e2e.mail import add_user, token

pytestmark = pytest.mark.e2e
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def fuzzed_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    # Login throttling would turn the fuzzed logins into 429s early: raise the limit.
    # A search for an index position never reached waits this long, then 503.
    env = {"MAILGRID_LOGIN_MAX_FAILURES": "0", "MAILGRID_SEARCH_WAIT_TIMEOUT": "0.3"}
    with running_suite(tmp_path_factory.mktemp("fuzz"), env) as suite:
        add_user(suite, "fuzz@example.test")
        yield suite


@pytest.fixture(scope="module")
def api_schema(fuzzed_suite: Suite) -> Any:
    return schemathesis.openapi.from_url(f"{fuzzed_suite.http_url}/openapi.json")


@pytest.fixture(scope="module")
def auth(fuzzed_suite: Suite) -> dict[str, str]:
    with httpx.Client(base_url=fuzzed_suite.http_url, timeout=30) as http:
        return token(http, "fuzz@example.test")


# No shrinking: a failure is reported as found (shrinking a slow HTTP case takes minutes).
# FUZZ_EXAMPLES raises the examples per operation for a deeper run than CI's.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "4")), deadline=None,
                derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


def test_every_operation_answers_without_5xx_and_errors_are_problem_json(
        api_schema: Any, fuzzed_suite: Suite, auth: dict[str, str]) -> None:
    # One loop over the operations (schemathesis' own pytest plugin predates pytest 9).
    tried = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/v1/auth/logout":
            continue
        for mode in MODES:
            # A valid long-poll waits its whole timeout (up to a minute): keep it short.
            fixed: dict[str, Any] = {}
            if operation.path == "/v1/events/poll":
                if mode is GenerationMode.NEGATIVE:
                    continue  # extra junk parameters still leave a valid minute-long wait
                fixed = {"query": {"timeout": 0.2}}
            try:
                check_operation(operation.as_strategy(generation_mode=mode, **fixed),
                                fuzzed_suite.http_url, auth)
            except Unsatisfiable:
                # No input of this operation can be made invalid (e.g. GET /healthz).
                assert mode is GenerationMode.NEGATIVE, operation.label
                continue
            tried += 1
    assert tried > 20


def check_operation(strategy: Any, base_url: str, auth: dict[str, str]) -> None:
    @FUZZ
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, headers=auth, timeout=30)
        # 503 with Retry-After is the documented "not yet" (e.g. a search for an index
        # position not reached); any other 5xx is a bug.
        if response.status_code == 503:
            assert response.headers.get("retry-after"), case.as_curl_command()
        else:
            case.validate_response(response, checks=[not_a_server_error])
        if response.status_code >= 400:
            content_type = (response.headers.get("content-type") or [""])[0]
            assert content_type.startswith(PROBLEM), \
                (case.method, case.formatted_path, response.status_code, response.text[:300])
            assert "Traceback" not in response.text

    run()
