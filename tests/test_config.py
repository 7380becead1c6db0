import pytest

from shared.config import load_settings
from shared.errors import ConfigError, UnknownChannel

SECRETS = {"WA_SECRET": "s", "WA_VERIFY": "v", "WA_TOKEN": "t"}


def write(tmp_path, body: str) -> dict:
    path = tmp_path / "channels.toml"
    path.write_text(body)
    return {"CHATSESSIONS_CONFIG": str(path), **SECRETS}


WA = """
[[channels]]
id = "wa"
platform = "whatsapp"
agent = "echo"
secrets = { app_secret = "WA_SECRET", verify_token = "WA_VERIFY", access_token = "WA_TOKEN" }
options = { phone_number_id = "1065" }
"""


def test_loads_channels_and_defaults(tmp_path):
    settings = load_settings(write(tmp_path, WA))
    wa = settings.channel("wa")
    assert wa.secrets["app_secret"] == "s"
    assert wa.api_base == "https://graph.facebook.com"
    assert settings.partitions == 16 and settings.embedded
    assert settings.database_url.startswith("sqlite")
    assert settings.visibility_timeout > settings.lease_seconds
    with pytest.raises(UnknownChannel):
        settings.channel("nope")


def test_secrets_are_not_in_repr(tmp_path):
    assert "'s'" not in repr(load_settings(write(tmp_path, WA)).channel("wa"))


def test_unset_secret_is_a_start_error(tmp_path):
    env = write(tmp_path, WA)
    del env["WA_TOKEN"]
    with pytest.raises(ConfigError, match="WA_TOKEN"):
        load_settings(env)


@pytest.mark.parametrize("body, message", [
    (WA.replace('platform = "whatsapp"', 'platform = "icq"'), "platform must be one of"),
    (WA.replace('options = { phone_number_id = "1065" }', ""), "phone_number_id is required"),
    (WA + WA, "appears twice"),
    ("partitions = 4\n", "no \\[\\[channels\\]\\]"),
    ("[[channels]\n", "not valid TOML"),
    (WA + 'session = { idle_minutes = 0 }\n', "must be positive"),
])
def test_bad_config_is_rejected_with_a_reason(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, body))


def test_bad_numbers_in_environment(tmp_path):
    env = write(tmp_path, WA)
    with pytest.raises(ConfigError, match="PARTITIONS"):
        load_settings({**env, "PARTITIONS": "many"})
    with pytest.raises(ConfigError, match="VISIBILITY_TIMEOUT"):
        load_settings({**env, "LEASE_SECONDS": "100", "VISIBILITY_TIMEOUT": "50"})


def test_non_redis_broker_needs_redis_for_the_ledger(tmp_path):
    env = {**write(tmp_path, WA), "BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"}
    with pytest.raises(ConfigError, match="REDIS_URL is required"):
        load_settings(env)
    assert load_settings({**env, "REDIS_URL": "redis://127.0.0.1:6379/0"}).redis_url == "redis://127.0.0.1:6379/0"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings({"CHATSESSIONS_CONFIG": str(tmp_path / "none.toml")})


def test_shipped_default_config_is_valid():
    from cli.embedded import DEMO_SECRETS

    settings = load_settings(dict(DEMO_SECRETS))
    assert {c.platform for c in settings.channels.values()} == {"whatsapp", "telegram", "discord"}


def test_agent_options_reach_the_agent_class(tmp_path, monkeypatch):
    from shared.agents import load_agent

    env = write(tmp_path, WA.replace('agent = "echo"', 'agent = "openai"') +
                '[channels.agent_options]\nmodel = "local-model"\nbase_url = "http://127.0.0.1:9/v1"\n')
    wa = load_settings(env).channel("wa")
    assert wa.agent_options == {"model": "local-model", "base_url": "http://127.0.0.1:9/v1"}
    agent = load_agent(wa.agent, wa.agent_options)
    assert agent.model == "local-model"
    with pytest.raises(ConfigError, match="bad agent_options"):
        load_agent("openai", {"modle": "typo"})
    with pytest.raises(ConfigError, match="need a class"):
        load_agent("shared.agents:BUILTIN", {"x": 1})
