"""Key records: generation, hashing, validation of key API fields, serialisation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mitmroute.auth.keys import (
    KeyRecord,
    abbreviate,
    hash_key,
    keys_db_path,
    make_record,
    new_key,
    parse_fields,
    token_of,
)
from mitmroute.errors import ProxyError

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def test_new_keys_are_random_and_stored_as_sha256():
    a, b = new_key(), new_key()
    assert a != b and a.startswith("sk-") and len(a) > 40
    record = make_record(a, {}, NOW)
    assert record.token == hash_key(a) and len(record.token) == 64
    assert record.key_name == abbreviate(a) == f"sk-...{a[-4:]}"
    assert a not in record.to_json()


def test_token_of_accepts_a_key_or_its_token():
    key = new_key()
    assert token_of(key) == token_of(hash_key(key)) == hash_key(key)


def test_record_round_trips_through_json():
    record = make_record(new_key(), parse_fields({
        "key_alias": "a", "team_id": "t", "metadata": {"team": "x", "n": 1},
        "models": ["gpt-4o"], "max_budget": 50, "budget_duration": "30d", "rpm_limit": 10,
        "tpm_limit": 1000, "duration": "7d"}, NOW), NOW)  # fmt: skip
    again = KeyRecord.from_json(record.to_json())
    assert again == record
    assert again.expires == NOW + timedelta(days=7)
    assert again.public()["expires"] == (NOW + timedelta(days=7)).isoformat()


def test_team_is_team_id_else_metadata_team():
    assert KeyRecord("t", "n", team_id="a", metadata={"team": "b"}).team == "a"
    assert KeyRecord("t", "n", metadata={"team": "b"}).team == "b"
    assert KeyRecord("t", "n").team is None


def test_model_access():
    assert KeyRecord("t", "n").allows("anything")
    limited = KeyRecord("t", "n", models=["gpt-4o", "claude-*"])
    assert limited.allows("gpt-4o") and limited.allows("claude-opus")
    assert not limited.allows("gpt-4o-mini")
    assert limited.allows("alias-name", "gpt-4o")  # the requested name or its model group
    assert KeyRecord("t", "n", models=["all-proxy-models"]).allows("x")


def test_expiry():
    record = KeyRecord("t", "n", expires=NOW)
    assert record.expired(NOW) and not record.expired(NOW - timedelta(seconds=1))
    assert not KeyRecord("t", "n").expired(NOW)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_budget": -1}, "max_budget"),
        ({"max_budget": "ten"}, "max_budget"),
        ({"rpm_limit": 1.5}, "rpm_limit"),
        ({"tpm_limit": True}, "tpm_limit"),
        ({"budget_duration": "monthly"}, "budget_duration"),
        ({"duration": "0s"}, "duration"),
        ({"models": "gpt-4o"}, "models"),
        ({"metadata": []}, "metadata"),
        ({"key_alias": ""}, "key_alias"),
        ({"blocked": "no"}, "blocked"),
    ],
)
def test_invalid_fields_name_the_param(body, param):
    with pytest.raises(ProxyError) as e:
        parse_fields(body, NOW)
    assert e.value.status == 400 and e.value.param == param


def test_null_clears_a_field():
    assert parse_fields({"max_budget": None, "models": None, "duration": None}, NOW) == {
        "max_budget": None, "models": [], "expires": None}  # fmt: skip


def test_keys_file_sits_beside_the_spend_log():
    assert keys_db_path("./data/spend.duckdb") == "data/spend.keys.sqlite"
    assert keys_db_path("/var/x/log.db") == "/var/x/log.keys.sqlite"
    assert keys_db_path(":memory:") is None
