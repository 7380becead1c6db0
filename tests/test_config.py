import pytest

from shared.config import DEV_SECRET_KEY, load_settings
from shared.errors import ConfigError, UnknownChannel

SECRETS = {"WA_SECRET": "s", "WA_VERIFY": "v", "WA_TOKEN": "t", "SECRET_KEY": "test-secret-key-0123456789abcdefghijklmnop"}


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


def test_admin_token_must_be_long(tmp_path):
    env = write(tmp_path, WA)
    token = "admin-token-" + "x" * 20  # 32 characters
    assert load_settings({**env, "ADMIN_TOKEN": token}).admin_token == token
    with pytest.raises(ConfigError, match="ADMIN_TOKEN must be at least 32 characters, got 31"):
        load_settings({**env, "ADMIN_TOKEN": token[:-1]})


def test_admin_bind_is_an_address_and_needs_the_token(tmp_path):
    env = {**write(tmp_path, WA), "ADMIN_TOKEN": "admin-token-" + "x" * 20}
    assert load_settings(env).admin_bind is None  # /admin on the ingress
    assert load_settings({**env, "ADMIN_BIND": "127.0.0.1:8001"}).admin_bind == "127.0.0.1:8001"
    assert load_settings({**env, "ADMIN_BIND": "[::1]:8001"}).admin_bind == "[::1]:8001"
    for bad in ("8001", "127.0.0.1", "127.0.0.1:0", "localhost:http", ":8001", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="ADMIN_BIND must be host:port"):
            load_settings({**env, "ADMIN_BIND": bad})
    with pytest.raises(ConfigError, match="ADMIN_BIND is set but neither ADMIN_TOKEN nor \\[\\[operators\\]\\] is"):
        load_settings({**env, "ADMIN_TOKEN": "", "ADMIN_BIND": "127.0.0.1:8001"})


def test_secret_key_is_required_outside_the_embedded_process_and_must_be_long(tmp_path):
    env = {**write(tmp_path, WA), "BROKER_URL": "redis://127.0.0.1:6379/0"}
    assert load_settings(env).secret_key == SECRETS["SECRET_KEY"]
    with pytest.raises(ConfigError, match="SECRET_KEY is required"):
        load_settings({**env, "SECRET_KEY": ""})
    with pytest.raises(ConfigError, match="at least 32 characters"):
        load_settings({**env, "SECRET_KEY": "short"})
    embedded = load_settings({**write(tmp_path, WA), "SECRET_KEY": ""})
    assert embedded.embedded and embedded.secret_key == DEV_SECRET_KEY  # `chatsessions run` on one's own machine
    assert SECRETS["SECRET_KEY"] not in repr(load_settings(env))


def test_a_channel_id_is_short(tmp_path):
    with pytest.raises(ConfigError, match="at most 40 characters"):
        load_settings(write(tmp_path, WA.replace('id = "wa"', 'id = "' + "w" * 41 + '"')))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings({"CHATSESSIONS_CONFIG": str(tmp_path / "none.toml")})


def test_shipped_default_config_is_valid():
    from cli.embedded import DEMO_SECRETS

    settings = load_settings(dict(DEMO_SECRETS))
    assert {"whatsapp", "telegram", "discord"} <= {c.platform for c in settings.channels.values()}


def test_agent_options_reach_the_agent_class(tmp_path, monkeypatch):
    from workers.agents import load_agent

    env = write(tmp_path, WA.replace('agent = "echo"', 'agent = "openai"') +
                '[channels.agent_options]\nmodel = "local-model"\nbase_url = "http://127.0.0.1:9/v1"\n')
    wa = load_settings(env).channel("wa")
    assert wa.agent_options == {"model": "local-model", "base_url": "http://127.0.0.1:9/v1"}
    agent = load_agent(wa.agent, wa.agent_options)
    assert agent.model == "local-model"
    with pytest.raises(ConfigError, match="bad agent_options"):
        load_agent("openai", {"modle": "typo"})
    with pytest.raises(ConfigError, match="need a class"):
        load_agent("workers.agents:BUILTIN", {"x": 1})


# --------------------------------------------------------------------------------------------------------------------
# Session policies: [channels.session] and [[identities]]

from shared.config import DEFAULT_RESET_NOTICE, SessionOptions  # noqa: E402

TG = """
[[channels]]
id = "tg"
platform = "telegram"
agent = "echo"
secrets = { bot_token = "TG_TOKEN", secret_token = "TG_SECRET" }
options = { bot_username = "AcmeBot" }
"""
DC = """
[[channels]]
id = "dc"
platform = "discord"
agent = "echo"
secrets = { bot_token = "DC_TOKEN", public_key = "DC_KEY" }
"""
ALL_SECRETS = {"TG_TOKEN": "1:x", "TG_SECRET": "s", "DC_TOKEN": "t", "DC_KEY": "00" * 32}


def load_with(tmp_path, body: str):
    return load_settings({**write(tmp_path, body), **ALL_SECRETS})


def with_session(session: str, channels: str = WA) -> str:
    return channels + f"[channels.session]\n{session}\n"


def test_session_defaults_are_the_seeds_behaviour(tmp_path):
    settings = load_with(tmp_path, WA + TG + DC)
    wa, tg, dc = (settings.channel(c).session for c in ("wa", "tg", "dc"))
    for s in (wa, tg, dc):
        assert (s.scope, s.reset, s.burst, s.group_reply) == ("default", "never", "queue", "mentioned")
        assert (s.history_limit, s.history_chars, s.retention_days, s.idle_minutes) == (50, None, None, 30.0)
        assert s.reset_notice == DEFAULT_RESET_NOTICE == "(This is a new conversation.)"
        assert (s.reset_idle_hours, s.reset_hour, s.timezone) == (None, None, "UTC")
    # topics share the Telegram group's session; a Discord thread is its own channel: both as the seed keyed them
    assert (wa.threads, tg.threads, dc.threads) == (False, False, True)
    assert (wa.window_hours, wa.window_template, wa.window_template_language) == (24.0, None, "en_US")
    assert settings.identities == {} and settings.channel("wa").people == {}


def test_every_session_option_is_read(tmp_path):
    settings = load_with(tmp_path, with_session(
        'idle_minutes = 5\nhistory_limit = 20\nhistory_chars = 8000\nscope = "per-member"\nreset = "daily"\n'
        'reset_hour = 4\ntimezone = "America/Sao_Paulo"\nreset_notice = "Fresh start!"\ngroup_reply = "always"\n'
        'burst = "collect"\nretention_days = 30\nwindow_hours = 23.5\nwindow_template = "order_update"\n'
        'window_template_language = "pt_BR"'))
    s = settings.channel("wa").session
    assert s == SessionOptions(idle_minutes=5.0, history_limit=20, history_chars=8000, scope="per-member",
                               threads=False, reset="daily", reset_hour=4, timezone="America/Sao_Paulo",
                               reset_notice="Fresh start!", group_reply="always", burst="collect",
                               retention_days=30.0, window_hours=23.5, window_template="order_update",
                               window_template_language="pt_BR")
    assert isinstance(s.idle_minutes, float) and isinstance(s.retention_days, float)
    assert str(s.zone) == "America/Sao_Paulo"
    idle = load_with(tmp_path, with_session('reset = "idle"\nreset_idle_hours = 12\nburst = "latest"\nreset_notice = ""'))
    s = idle.channel("wa").session
    assert (s.reset, s.reset_idle_hours, s.burst, s.reset_notice) == ("idle", 12.0, "latest", "")
    threads = load_with(tmp_path, with_session("threads = true", TG) + with_session("threads = false", DC))
    assert threads.channel("tg").session.threads is True and threads.channel("dc").session.threads is False


@pytest.mark.parametrize("session, message", [
    ("colour = 1", r"unknown session options \['colour'\]"),
    ("idle_minutes = 0", "session.idle_minutes must be positive"),
    ("idle_minutes = -1", "session.idle_minutes must be positive"),
    ('idle_minutes = "30"', "session.idle_minutes must be a number"),
    ("history_limit = 0", "session.history_limit must be a positive whole number"),
    ("history_limit = 2.5", "session.history_limit must be a positive whole number"),
    ("history_limit = true", "session.history_limit must be a positive whole number"),
    ("history_chars = 0", "session.history_chars must be a positive whole number"),
    ('scope = "per-user"', 'session.scope must be one of "default" | "per-member" | "per-person"'),
    ("scope = 1", "session.scope must be one of"),
    ("threads = true", "session.threads: whatsapp has no threads"),
    ('reset = "weekly"', 'session.reset must be one of "never" | "idle" | "daily"'),
    ('reset = "idle"', 'session.reset = "idle" needs session.reset_idle_hours'),
    ('reset = "idle"\nreset_idle_hours = 0', "session.reset_idle_hours must be positive"),
    ("reset_idle_hours = 4", 'session.reset_idle_hours applies only with session.reset = "idle"'),
    ('reset = "daily"', r'session.reset = "daily" needs session.reset_hour \(0-23\)'),
    ('reset = "daily"\nreset_hour = 24', "session.reset_hour must be a whole hour from 0 to 23, got 24"),
    ('reset = "daily"\nreset_hour = -1', "session.reset_hour must be a whole hour from 0 to 23"),
    ('reset = "daily"\nreset_hour = 3.5', "session.reset_hour must be a whole hour"),
    ("reset_hour = 3", 'session.reset_hour applies only with session.reset = "daily"'),
    ('reset = "idle"\nreset_idle_hours = 1\ntimezone = "UTC"', 'session.timezone applies only with session.reset = "daily"'),
    ('reset = "daily"\nreset_hour = 3\ntimezone = "Mars/Olympus"', "session.timezone is not a known IANA time zone"),
    ('reset = "daily"\nreset_hour = 3\ntimezone = "../etc/passwd"', "session.timezone is not a known IANA time zone"),
    ('reset = "daily"\nreset_hour = 3\ntimezone = 2', "session.timezone must be an IANA time zone name"),
    ("reset_notice = 1", "session.reset_notice must be text"),
    ('group_reply = "never"', 'session.group_reply must be one of "always" | "mentioned"'),
    ('burst = "drop"', 'session.burst must be one of "queue" | "collect" | "latest"'),
    ("retention_days = 0", "session.retention_days must be positive"),
    ("window_hours = 25", "session.window_hours cannot exceed WhatsApp's 24-hour customer-service window"),
    ("window_hours = 0", "session.window_hours must be positive"),
    ('window_template = "Order Update"', "session.window_template must be a WhatsApp template name"),
    ('window_template = ""', "session.window_template must be a WhatsApp template name"),
    ('window_template_language = "english"', "session.window_template_language must be a WhatsApp language code"),
])
def test_bad_session_options_name_the_channel_and_key(tmp_path, session, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_with(tmp_path, with_session(session))
    assert "channel 'wa'" in str(err.value)


@pytest.mark.parametrize("key, value", [("window_hours", "12"), ("window_template", '"hello"'),
                                        ("window_template_language", '"en"')])
def test_window_options_are_whatsapp_only(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"channel 'tg': session.{key} applies to whatsapp channels only"):
        load_with(tmp_path, with_session(f"{key} = {value}", TG))


def test_session_must_be_a_table(tmp_path):
    with pytest.raises(ConfigError, match="channel 'wa': session must be a table"):
        load_with(tmp_path, WA + 'session = "per-member"\n')


def test_threads_is_a_boolean(tmp_path):
    with pytest.raises(ConfigError, match="channel 'tg': session.threads must be true or false"):
        load_with(tmp_path, with_session('threads = "yes"', TG))


IDENTITIES = """
[[identities]]
person = "alice"
whatsapp = "+55 11 98765-0001"
telegram = 381920001
discord = "402922222222222222"

[[identities]]
person = "bruno"
whatsapp = ["5511987650002", "5511987650003"]
"""


def test_identities_link_platform_users_to_a_person(tmp_path):
    settings = load_with(tmp_path, WA + TG + DC + IDENTITIES)
    assert settings.person_of("whatsapp", "5511987650001") == "alice"  # '+', spaces and dashes normalized
    assert settings.person_of("whatsapp", "+55 11 98765-0001") == "alice"
    assert settings.person_of("telegram", "381920001") == "alice"
    assert settings.person_of("discord", "402922222222222222") == "alice"
    assert settings.person_of("whatsapp", "5511987650003") == "bruno"
    assert settings.person_of("telegram", "5511987650002") is None  # ids are per platform
    assert settings.person_of("whatsapp", "not-a-number") is None
    alice = settings.identities["alice"]
    assert alice.ids == {"whatsapp": ("5511987650001",), "telegram": ("381920001",),
                         "discord": ("402922222222222222",)}
    assert alice.all_ids() == ("5511987650001", "381920001", "402922222222222222")
    assert settings.identity_of("alice") is alice and settings.identity_of("381920001") is alice
    assert settings.identity_of("5511987650002").person == "bruno" and settings.identity_of("nobody") is None
    # each channel carries its platform's links for the parser
    assert settings.channel("tg").people == {"381920001": "alice"}
    assert settings.channel("wa").people == {"5511987650001": "alice", "5511987650002": "bruno",
                                             "5511987650003": "bruno"}
    assert "5511987650001" not in repr(settings) and "5511987650001" not in repr(settings.channel("wa"))


@pytest.mark.parametrize("identities, message", [
    ('[[identities]]\nwhatsapp = "1"\n', r"\[\[identities\]\] #1: person must be a name"),
    ('[[identities]]\nperson = "al ice"\nwhatsapp = "1"\n', "person must be a name"),
    ('[[identities]]\nperson = "a:b"\nwhatsapp = "1"\n', "person must be a name"),
    ('[[identities]]\nperson = "alice"\n', "identity 'alice' links no platform account"),
    ('[[identities]]\nperson = "alice"\nicq = "1"\n', "identity 'alice': unknown key 'icq'"),
    ('[[identities]]\nperson = "alice"\nwhatsapp = "phone"\n', "identity 'alice': whatsapp 'phone' is not a whatsapp user id"),
    ('[[identities]]\nperson = "alice"\ntelegram = "@alice"\n', "telegram '@alice' is not a telegram user id"),
    ('[[identities]]\nperson = "alice"\ndiscord = true\n', "discord True must be a string or a number"),
    ('[[identities]]\nperson = "alice"\ndiscord = []\n', "identity 'alice': discord lists no user id"),
    ('[[identities]]\nperson = "alice"\nwhatsapp = "1"\n[[identities]]\nperson = "alice"\ntelegram = "2"\n',
     "identity 'alice' appears twice"),
    ('[[identities]]\nperson = "alice"\nwhatsapp = "+1 555"\n[[identities]]\nperson = "bob"\nwhatsapp = "1555"\n',
     "identity 'bob': whatsapp user 1555 already belongs to person 'alice'"),
    ('identities = "alice"\n', "identities must be \\[\\[identities\\]\\] tables"),
])
def test_bad_identities_are_rejected(tmp_path, identities, message):
    with pytest.raises(ConfigError, match=message):
        load_with(tmp_path, identities + WA)


def test_same_id_on_two_platforms_may_be_two_people(tmp_path):
    body = WA + '[[identities]]\nperson = "a"\ntelegram = "7"\n[[identities]]\nperson = "b"\ndiscord = "7"\n'
    settings = load_with(tmp_path, body)
    assert (settings.person_of("telegram", "7"), settings.person_of("discord", "7")) == ("a", "b")


def test_per_person_needs_an_identity_on_the_platform(tmp_path):
    with pytest.raises(ConfigError, match="channel 'tg': session.scope = \"per-person\" but no \\[\\[identities\\]\\] "
                                          "entry names a telegram user"):
        load_with(tmp_path, with_session('scope = "per-person"', TG) + '[[identities]]\nperson = "a"\nwhatsapp = "1"\n')
    settings = load_with(tmp_path, with_session('scope = "per-person"', TG) + '[[identities]]\nperson = "a"\ntelegram = "1"\n')
    assert settings.channel("tg").session.scope == "per-person"


def test_person_is_a_reserved_channel_id(tmp_path):
    with pytest.raises(ConfigError, match="channel id 'person' is reserved"):
        load_with(tmp_path, WA.replace('id = "wa"', 'id = "person"'))


def test_channel_id_cannot_hold_the_key_separator(tmp_path):
    with pytest.raises(ConfigError, match="channel 'w:a': a channel id cannot contain ':'"):
        load_with(tmp_path, WA.replace('id = "wa"', 'id = "w:a"'))


@pytest.mark.parametrize("value, message", [
    ("*", "cannot be '\\*'"),
    ("10.0.0.1/8", "'10.0.0.1/8' is not an IP address or network"),  # host bits set: a typo
    ("proxy.internal", "'proxy.internal' is not an IP address or network"),
    ("10.0.0.0/8;rm", "is not an IP address or network"),
])
def test_bad_trusted_proxies_stop_the_process_at_start(tmp_path, value, message):
    with pytest.raises(ConfigError, match=f"TRUSTED_PROXIES.*{message}"):
        load_settings({**write(tmp_path, WA), "TRUSTED_PROXIES": value})


def ingress_argv(monkeypatch, env: dict[str, str], *options: str) -> list[str]:
    """The gunicorn command `chatsessions ingress` execs with this environment."""
    from cli import main
    from shared.config import get_settings

    for name, env_value in env.items():
        monkeypatch.setenv(name, env_value)
    started: list[list[str]] = []
    monkeypatch.setattr(main, "_exec", lambda argv: started.append(argv) or 0)
    get_settings.cache_clear()
    try:
        assert main.main(["ingress", "--bind", "127.0.0.1:0", *options]) == 0
    finally:
        get_settings.cache_clear()
    [argv] = started
    return argv


@pytest.mark.parametrize("value, allowed", [("", ""), ("10.0.0.0/8, 192.0.2.1", "10.0.0.0/8,192.0.2.1/32")])
def test_chatsessions_ingress_gives_gunicorn_the_trusted_proxies(tmp_path, monkeypatch, value, allowed):
    """gunicorn believes X-Forwarded-Proto from the same peers as the app; unset, from nobody (its own default
    would be 127.0.0.1)."""
    argv = ingress_argv(monkeypatch, {**write(tmp_path, WA), "TRUSTED_PROXIES": value})
    assert argv[argv.index("--forwarded-allow-ips") + 1] == allowed


@pytest.mark.parametrize("options, accesslog", [((), None), (("--access-log",), "-")])
def test_chatsessions_ingress_has_gunicorn_write_an_access_log_only_when_asked(tmp_path, monkeypatch, options,
                                                                              accesslog):
    """gunicorn formats an access log line for every request whenever its `accesslog` is set, to /dev/null too."""
    assert gunicorn_config(ingress_argv(monkeypatch, write(tmp_path, WA), *options)).accesslog == accesslog


def gunicorn_config(argv: list[str]):
    """gunicorn's Config as gunicorn reads this command line."""
    from gunicorn.config import Config

    config = Config()
    for name, value in vars(config.parser().parse_args(argv[1:])).items():
        if value is not None and name != "args":
            config.set(name.lower(), value)
    return config


@pytest.mark.parametrize("options, worker_class, concurrency", [
    ((), "gevent", ("worker_connections", 1000)),
    (("--connections", "300"), "gevent", ("worker_connections", 300)),
    (("--pool", "threads", "--threads", "12"), "gthread", ("threads", 12)),
])
def test_chatsessions_ingress_serves_on_greenlets_unless_told_threads(tmp_path, monkeypatch, options, worker_class,
                                                                      concurrency):
    config = gunicorn_config(ingress_argv(monkeypatch, write(tmp_path, WA), *options))
    assert config.worker_class_str == worker_class
    assert getattr(config, concurrency[0]) == concurrency[1]


def test_secure_cookies_is_on_outside_the_embedded_process_and_can_be_turned_off(tmp_path):
    env = {**write(tmp_path, WA), "BROKER_URL": "redis://127.0.0.1:6379/0"}
    assert load_settings(env).secure_cookies is True
    assert load_settings({**write(tmp_path, WA)}).secure_cookies is False  # `chatsessions run`: plain http locally
    for value, secure in (("false", False), ("0", False), ("No", False), ("true", True), ("1", True), ("on", True)):
        assert load_settings({**env, "SECURE_COOKIES": value}).secure_cookies is secure
        assert load_settings({**write(tmp_path, WA), "SECURE_COOKIES": value}).secure_cookies is secure
    with pytest.raises(ConfigError, match="SECURE_COOKIES must be true or false, got 'maybe'"):
        load_settings({**env, "SECURE_COOKIES": "maybe"})


def test_every_unset_secret_of_a_channel_is_named_at_once(tmp_path):
    env = write(tmp_path, WA)
    for name in ("WA_TOKEN", "WA_VERIFY"):
        del env[name]
    with pytest.raises(ConfigError, match=r"environment variables WA_VERIFY \(secrets.verify_token\), WA_TOKEN "
                                          r"\(secrets.access_token\) are not set"):
        load_settings(env)


def test_a_channel_knows_which_variable_holds_each_secret(tmp_path):
    wa = load_settings(write(tmp_path, WA)).channel("wa")
    assert wa.secret_env == {"app_secret": "WA_SECRET", "verify_token": "WA_VERIFY", "access_token": "WA_TOKEN"}
    assert "WA_TOKEN" in repr(wa) and "'t'" not in repr(wa)  # the names may be shown, the values never
