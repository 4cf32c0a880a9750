"""Request ids: `mr-` and a random version-4 UUID's hex, as `uuid.uuid4().hex` spells it."""

from __future__ import annotations

import re
import uuid

from mitmroute.request import new_request_id


def test_a_request_id_is_a_version_4_uuid_in_hex() -> None:
    ids = [new_request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for request_id in ids:
        assert re.fullmatch(r"mr-[0-9a-f]{32}", request_id)
        parsed = uuid.UUID(hex=request_id[3:])
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert parsed.hex == request_id[3:]
