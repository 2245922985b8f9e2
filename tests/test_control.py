"""Control requests as data: what parses, and the reason and field of each refusal. The
daemon's handling of them is in tests/test_daemon.py and tests/reliability/test_hostile.py."""

from __future__ import annotations

import orjson
import pytest

from chute.intake import control

RUN = "20261122_101500_a1b2c3"
NEW = "20261122_101501_000000"


def test_the_cli_requests_round_trip() -> None:
    for request in (
        control.Cancel(RUN),
        control.Retry(RUN, None, NEW),
        control.Retry(RUN, "load", NEW),
        control.Unschedule("nightly-etl"),
    ):
        assert control.parse(orjson.dumps(request.as_json())) == request


BAD = {
    "empty": (b"", "", "is not JSON"),
    "not_json": (b"cancel it", "", "is not JSON"),
    "array": (b"[]", "", "is a JSON array, not an object"),
    "string": (b'"x"', "", "is a JSON string, not an object"),
    "number": (b"1", "", "is a JSON number, not an object"),
    "null": (b"null", "", "is a JSON null, not an object"),
    "no_action": (b"{}", "action", "null is not an action; the actions are cancel, retry"),
    "unknown_action": (b'{"action": "explode"}', "action", "explode is not an action"),
    "action_not_string": (b'{"action": ["cancel"]}', "action", '["cancel"] is not an action'),
    "missing_run": (b'{"action": "cancel"}', "run", "missing; a cancel request needs it"),
    "run_mistyped": (b'{"action": "cancel", "run": 5}', "run", "5: not a run id"),
    "run_traversal": (
        b'{"action": "cancel", "run": "../queue"}',
        "run",
        "../queue: not a run id; a run id looks like 20261122_101500_a1b2c3",
    ),
    "unknown_field": (
        b'{"action": "cancel", "run": "%s", "force": true}' % RUN.encode(),
        "force",
        "unknown field of a cancel request (its fields: action, run)",
    ),
    "new_run_id_traversal": (
        b'{"action": "retry", "run": "%s", "new_run_id": "../queue"}' % RUN.encode(),
        "new_run_id",
        "../queue: not a run id",
    ),
    "new_run_id_absolute": (
        b'{"action": "retry", "run": "%s", "new_run_id": "/srv"}' % RUN.encode(),
        "new_run_id",
        "/srv: not a run id",
    ),
    "new_run_id_missing": (
        b'{"action": "retry", "run": "%s"}' % RUN.encode(),
        "new_run_id",
        "missing; a retry request needs it",
    ),
    "from_traversal": (
        b'{"action": "retry", "run": "%s", "from": "../x", "new_run_id": "%s"}'
        % (RUN.encode(), NEW.encode()),
        "from",
        "../x: not a stage name",
    ),
    "schedule_traversal": (
        b'{"action": "unschedule", "name": "../queue/%s"}' % RUN.encode(),
        "name",
        f"../queue/{RUN}: not a schedule name",
    ),
    "schedule_absolute": (
        b'{"action": "unschedule", "name": "/etc/passwd"}',
        "name",
        "/etc/passwd: not a schedule name",
    ),
}


@pytest.mark.parametrize(("data", "field", "message"), BAD.values(), ids=BAD.keys())
def test_a_bad_request_says_which_field_and_why(data: bytes, field: str, message: str) -> None:
    with pytest.raises(control.BadRequest) as caught:
        control.parse(data)
    assert caught.value.reason == "bad_request"
    assert caught.value.field == field
    assert message in str(caught.value)
