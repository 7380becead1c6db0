"""InboundMessage's own guard: whatever an adapter builds fits the columns it is stored in."""

import pytest

from shared.errors import MalformedPayload
from shared.messages import ID_LIMITS, NAME_LIMIT, InboundMessage


def message(**fields) -> InboundMessage:
    base = dict(channel_id="wa", platform="whatsapp", session_key="wa:dm:5511", chat_id="5511", chat_kind="dm",
                sender_id="5511", sender_name="Ana", text="hi", platform_message_id="wamid.1", sent_at=1.0)
    return InboundMessage(**{**base, **fields})


@pytest.mark.parametrize("field", sorted(ID_LIMITS))
def test_an_id_longer_than_its_column_is_malformed(field):
    message(**{field: "1" * ID_LIMITS[field]})
    with pytest.raises(MalformedPayload, match=field):
        message(**{field: "1" * (ID_LIMITS[field] + 1)})


@pytest.mark.parametrize("field", ["chat_id", "sender_id", "platform_message_id", "session_key"])
def test_an_id_holding_a_nul_is_malformed(field):
    """PostgreSQL refuses NUL in text: the message could be accepted but never stored."""
    with pytest.raises(MalformedPayload, match=field):
        message(**{field: "55\x0011"})


def test_nul_in_text_and_names_is_replaced_and_long_names_are_cut():
    msg = message(text="a\x00b", sender_name="N\x00" + "x" * 500)
    assert msg.text == "a\ufffdb" and "\x00" not in msg.sender_name
    assert len(msg.sender_name) == NAME_LIMIT and msg.sender_name.endswith("…")
    assert InboundMessage.from_dict(msg.to_dict()) == msg
