import pytest

from shared.errors import InvalidSignature
from shared.signing import keyed_hash, sign, unsign

KEY = "k" * 32


def test_keyed_hash_is_stable_per_key_and_purpose_and_hides_the_value():
    pseudonym = keyed_hash(KEY, "log", "wa:dm:5511999990000")
    assert pseudonym == keyed_hash(KEY, "log", "wa:dm:5511999990000")
    assert pseudonym != keyed_hash("j" * 32, "log", "wa:dm:5511999990000")
    assert pseudonym != keyed_hash(KEY, "visitor", "wa:dm:5511999990000")
    assert "5511999990000" not in pseudonym and len(pseudonym) == 22


def test_only_values_signed_with_the_key_and_purpose_are_accepted():
    token = sign(KEY, "visitor", "abc_DEF-123")
    assert unsign(KEY, "visitor", token) == "abc_DEF-123"
    for forged in (None, "", "abc_DEF-123", token + "x", "other." + token.rpartition(".")[2],
                   sign("j" * 32, "visitor", "abc_DEF-123"), sign(KEY, "other", "abc_DEF-123")):
        with pytest.raises(InvalidSignature):
            unsign(KEY, "visitor", forged)
