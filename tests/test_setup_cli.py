"""`chatsessions config init` and `chatsessions setup` as a user runs them, against the platform stand-ins
(cli/standins/platforms.py, the ones the integration tests use), which answer and refuse like the real APIs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from cli.connect import fill_option
from cli.main import main
from cli.standins.payloads import encode, telegram_headers, telegram_text
from cli.standins.platforms import StandInPlatforms
from shared.channels.discord import APPLICATION_COMMANDS, DiscordChannel
from shared.config import load_settings

REPO = Path(__file__).resolve().parents[1]
URL = "https://chat.example.com"
TG_TOKEN = "424242:AAH-good-token_for-the-bot"
WA_TOKEN, WA_NUMBER, WA_ACCOUNT = "EAAG-wa-system-user-token", "106540352242922", "102290129340398"
DC_TOKEN, DC_APP = "MTMwMDAw.dc-bot-token", "1300000000000000001"
DC_KEY = "de18658095d004b28d2eb7638b14aac7ce85ed7567e7839fe81df237691194e8"
ENV = {"TELEGRAM_BOT_TOKEN": TG_TOKEN, "TELEGRAM_SECRET_TOKEN": "tg-secret_Token-1",
       "WHATSAPP_APP_SECRET": "wa-app-secret", "WHATSAPP_VERIFY_TOKEN": "wa-verify-me",
       "WHATSAPP_ACCESS_TOKEN": WA_TOKEN,
       "DISCORD_BOT_TOKEN": DC_TOKEN, "DISCORD_PUBLIC_KEY": DC_KEY}


@pytest.fixture
def standin():
    s = StandInPlatforms().start()
    yield s
    s.stop()


def at_standin(path: Path, standin: StandInPlatforms) -> None:
    """Point the channels `config init` wrote at the stand-in (what `api_base` is for) and fill in the WhatsApp
    number id a user copies from Meta's dashboard."""
    text = path.read_text()
    for platform in ("telegram", "whatsapp", "discord"):
        text = text.replace(f'platform = "{platform}"\n',
                            f'platform = "{platform}"\napi_base = "{standin.base(platform)}"\n')
    path.write_text(text.replace('phone_number_id = ""', f'phone_number_id = "{WA_NUMBER}"'))


@pytest.fixture
def configured(tmp_path, monkeypatch, standin, capsys):
    """All four platforms from `config init`, their variables set, pointed at the stand-in; returns the file."""
    path = tmp_path / "channels.toml"
    assert main(["config", "init", "--out", str(path), "--platform", "telegram", "--platform", "whatsapp",
                 "--platform", "discord", "--platform", "webchat"]) == 0
    capsys.readouterr()
    at_standin(path, standin)
    for name in [n for n in os.environ if n.startswith(("CHATSESSIONS_", "PUBLIC_URL", "SECURE_COOKIES"))]:
        monkeypatch.delenv(name)
    for name, value in {**ENV, "CHATSESSIONS_CONFIG": str(path)}.items():
        monkeypatch.setenv(name, value)
    return path


def setup(capsys, *argv: str) -> tuple[int, str]:
    """`chatsessions setup ARGV` in this process: (exit code, everything it printed)."""
    capsys.readouterr()
    try:
        code = main(["setup", *argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out + err


def cli(env: dict[str, str], *argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m cli ARGV` as its own process, as a user types it."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CHATSESSIONS_", "TELEGRAM_", "PUBLIC_URL"))}
    return subprocess.run([sys.executable, "-m", "cli", *argv], env={**full, **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


# --------------------------------------------------------------------------------------------------------------------
# The newcomer's path: config init, the variables, check, setup, run


def test_a_newcomer_connects_a_telegram_bot_with_config_init_setup_and_run(tmp_path, standin):
    bot = standin.accounts.telegram_bot(TG_TOKEN, "AcmeSupportBot")
    done = cli({}, "config", "init", "--platform", "telegram", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "channels.toml"
    assert "wrote channels.toml: channel telegram" in done.stdout
    printed = dict(re.findall(r"export (\w+)=(\S+)", done.stdout))
    assert printed["CHATSESSIONS_CONFIG"] == str(path) and printed["TELEGRAM_BOT_TOKEN"] == "..."
    secret = printed["TELEGRAM_SECRET_TOKEN"]  # made up by config init, used as printed
    at_standin(path, standin)
    env = {"CHATSESSIONS_CONFIG": str(path), "TELEGRAM_SECRET_TOKEN": secret,
           "DATABASE_URL": f"sqlite:///{tmp_path}/chatsessions.db"}

    done = cli(env, "check")  # the token is not set yet: check names it
    assert done.returncode == 2
    assert "environment variable TELEGRAM_BOT_TOKEN (secrets.bot_token) is not set" in done.stdout
    env["TELEGRAM_BOT_TOKEN"] = TG_TOKEN
    assert cli(env, "db", "upgrade").returncode == 0
    done = cli(env, "check")
    assert done.returncode == 0, done.stdout
    assert "ok    channel telegram  telegram, agent demo" in done.stdout

    done = cli(env, "setup", "telegram", "--url", URL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert bot.webhook == {"url": f"{URL}/webhooks/telegram", "secret_token": secret, "allowed_updates": ["message"]}
    assert 'wrote bot_username = "AcmeSupportBot"' in done.stdout
    assert load_settings(env).channel("telegram").options["bot_username"] == "AcmeSupportBot"
    assert TG_TOKEN not in done.stdout and secret not in done.stdout

    # `chatsessions run`, and Telegram's update (with the secret token setWebhook gave it) is answered
    run = subprocess.Popen([sys.executable, "-m", "cli", "run", "--port", "0"], cwd=tmp_path, text=True,
                           env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING"},
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        lines = iter(run.stdout.readline, "")
        started = next((line for line in lines if line.startswith("chatsessions running at")), "")
        assert started, "`chatsessions run` did not start"
        ingress = started.split()[3]
        update = telegram_text(381920001, "private", 381920001, "Ana", "hi, my name is Ana", 1, 1)
        answer = requests.post(f"{ingress}/webhooks/telegram", data=encode(update), headers=telegram_headers(secret),
                               timeout=10)
        assert answer.status_code == 200
        [reply] = standin.wait_for(1, timeout=30)
        assert (reply.platform, reply.chat_id, reply.text) == ("telegram", "381920001",
                                                               "Nice to meet you, Ana! How can I help?")
        forged = requests.post(f"{ingress}/webhooks/telegram", data=encode(update),
                               headers=telegram_headers("not-the-secret"), timeout=10)
        assert forged.status_code == 401
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=30)
        run.stdout.close()


# --------------------------------------------------------------------------------------------------------------------
# Telegram


def test_telegram_refuses_a_token_it_does_not_know(configured, standin, capsys, monkeypatch):
    standin.accounts.telegram_bot(TG_TOKEN, "AcmeSupportBot")
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "999999:AAH-revoked-token")
    code, out = setup(capsys, "telegram", "--url", URL)
    assert code == 2
    assert "FAIL  token" in out and "HTTP 401: the credentials were refused (Unauthorized)" in out
    assert "Telegram knows no bot with the token in $TELEGRAM_BOT_TOKEN" in out
    assert "revoked-token" not in out

    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "no-colon-token")
    code, out = setup(capsys, "telegram", "--url", URL)
    assert code == 2 and "HTTP 404" in out and "(Not Found)" in out
    assert "The token in $TELEGRAM_BOT_TOKEN is malformed: a bot token looks like 123456789:AAH..." in out


@pytest.mark.parametrize("url, message", [
    ("http://chat.example.com", "Telegram calls only https:// addresses, not http://chat.example.com"),
    ("https://chat.example.com:8000", "Telegram calls webhooks only on ports 443, 80, 88 and 8443, not 8000"),
    ("https://127.0.0.1", "Telegram cannot reach 127.0.0.1"),
    ("https://localhost:8443", "Telegram cannot reach localhost"),
    ("chat.example.com", "--url 'chat.example.com' is not an address such as https://chat.example.com"),
    ("https://chat.example.com/?x=1", "is not an address such as"),
])
def test_an_address_telegram_cannot_call_is_explained_before_asking_it(configured, standin, capsys, url, message):
    bot = standin.accounts.telegram_bot(TG_TOKEN, "AcmeSupportBot")
    code, out = setup(capsys, "telegram", "--url", url)
    assert code == 2 and "FAIL  url" in out and message in out, out
    assert bot.webhook == {}


def test_telegrams_own_refusal_of_a_webhook_address_is_explained(configured, standin, capsys):
    bot = standin.accounts.telegram_bot(TG_TOKEN, "AcmeSupportBot")
    code, out = setup(capsys, "telegram", "--url", "https://chat.example.invalid")
    assert code == 2 and "FAIL  setWebhook" in out
    assert "(Bad Request: bad webhook: Failed to resolve host: Name or service not known)" in out
    assert "Telegram does not accept https://chat.example.invalid/webhooks/telegram as a webhook" in out
    assert bot.webhook == {}


@pytest.mark.parametrize("secret", ["abc+/=", "has space", "x" * 257, "ünïcode"])
def test_a_secret_token_telegram_would_refuse_is_caught_by_check_and_setup(configured, standin, capsys, monkeypatch,
                                                                           secret):
    bot = standin.accounts.telegram_bot(TG_TOKEN, "AcmeSupportBot")
    monkeypatch.setenv("TELEGRAM_SECRET_TOKEN", secret)
    why = "$TELEGRAM_SECRET_TOKEN must be 1-256 characters of A-Z, a-z, 0-9, _ and - (Telegram's setWebhook refuses"
    capsys.readouterr()
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  channel telegram  {why}" in out and "ok    channel whatsapp" in out
    code, out = setup(capsys, "telegram", "--url", URL)
    assert code == 2 and f"FAIL  secret        {why}" in out and bot.webhook == {}
    assert secret not in out


def test_no_address_is_a_usage_error(configured, standin, capsys, monkeypatch):
    code, out = setup(capsys, "telegram")
    assert code == 2 and "setup needs the ingress's public address" in out
    monkeypatch.setenv("PUBLIC_URL", URL)  # read when the parser is built: the default of --url
    bot = standin.accounts.telegram_bot(TG_TOKEN, "AcmeSupportBot")
    assert setup(capsys, "telegram")[0] == 0 and bot.webhook["url"] == f"{URL}/webhooks/telegram"


def test_a_bot_username_that_is_not_the_tokens_bot_stops_setup(configured, standin, capsys):
    bot = standin.accounts.telegram_bot(TG_TOKEN, "AcmeSupportBot")
    configured.write_text(configured.read_text().replace('bot_username = ""', 'bot_username = "OtherBot"'))
    code, out = setup(capsys, "telegram", "--url", URL)
    assert code == 2
    assert "the token belongs to @AcmeSupportBot, but options.bot_username is 'OtherBot'" in out
    assert f'Set bot_username = "AcmeSupportBot" in {configured}, channel \'telegram\'' in out
    assert bot.webhook == {}  # nothing set while the configuration disagrees with Telegram
    assert 'bot_username = "OtherBot"' in configured.read_text()  # a value the user wrote is never overwritten


def test_setup_reports_what_telegram_will_do_and_drops_pending_updates_on_request(configured, standin, capsys):
    bot = standin.accounts.telegram_bot(TG_TOKEN, "AcmeSupportBot", pending_update_count=7)
    code, out = setup(capsys, "telegram", "--url", URL)
    assert code == 0 and "Webhook was set" in out and "7 update(s) waiting for delivery" in out
    bot.last_error_date, bot.last_error_message = 1767225600, "Connection refused"
    code, out = setup(capsys, "telegram", "--url", URL)
    assert code == 0 and "Webhook is already set" in out
    assert "note  last error    2026-01-01 00:00:00 UTC: Connection refused" in out
    code, out = setup(capsys, "telegram", "--url", URL, "--drop-pending-updates")
    assert code == 0 and "pending updates dropped" in out and "0 update(s) waiting" in out
    assert bot.pending_update_count == 0


@pytest.mark.parametrize("privacy_off, group_reply, expected, step", [
    (True, "mentioned", "ok    groups        privacy mode is off", False),
    (False, "mentioned", "privacy mode is on: in groups Telegram delivers only commands and replies", True),
    (False, "always", 'privacy mode is on, yet group_reply = "always"', True),
])
def test_privacy_mode_advice_follows_the_bot_and_group_reply(configured, standin, capsys, privacy_off, group_reply,
                                                             expected, step):
    standin.accounts.telegram_bot(TG_TOKEN, "AcmeSupportBot", can_read_all_group_messages=privacy_off)
    configured.write_text(configured.read_text().replace('group_reply = "mentioned"', f'group_reply = "{group_reply}"'))
    code, out = setup(capsys, "telegram", "--url", URL)
    assert code == 0 and expected in out
    assert ("/setprivacy, choose @AcmeSupportBot, then Disable" in out) is step


def test_an_unreachable_platform_is_a_failure_not_a_refusal(configured, capsys):
    configured.write_text(re.sub(r'api_base = "http://127.0.0.1:\d+/telegram"', 'api_base = "http://127.0.0.1:1/tg"',
                                 configured.read_text()))
    code, out = setup(capsys, "telegram", "--url", URL, "--timeout", "2")
    assert code == 1 and "FAIL  token" in out and "ConnectionError" in out and TG_TOKEN not in out


def test_fill_option_writes_only_the_empty_value_of_that_channel(tmp_path):
    path = tmp_path / "c.toml"
    text = ('# mine\n[[channels]]\nid = "a"\noptions = { bot_username = "" }  # keep\n\n'
            '[[channels]]\nid = "b"\noptions = { bot_username = "" }\n')
    path.write_text(text)
    assert fill_option(path, "b", "bot_username", "BeeBot")
    assert path.read_text() == text.replace('"b"\noptions = { bot_username = "" }',
                                            '"b"\noptions = { bot_username = "BeeBot" }')
    assert not fill_option(path, "b", "bot_username", "Other")  # set already
    assert not fill_option(path, "c", "bot_username", "Other")  # no such channel
    assert not fill_option(tmp_path / "missing.toml", "a", "bot_username", "X")


# --------------------------------------------------------------------------------------------------------------------
# WhatsApp


def test_whatsapp_setup_checks_the_number_subscribes_the_app_and_prints_the_dashboard_steps(configured, standin,
                                                                                            capsys):
    number = standin.accounts.whatsapp_number(WA_TOKEN, WA_NUMBER, WA_ACCOUNT, display_phone_number="+55 11 4000-0000")
    code, out = setup(capsys, "whatsapp", "--url", URL)
    assert code == 0, out
    assert "+55 11 4000-0000 (Acme Support): the token in $WHATSAPP_ACCESS_TOKEN may use phone number id" in out
    assert f"WhatsApp Business Account {WA_ACCOUNT} (the one the token may manage)" in out
    assert number.subscribed and "sends its webhooks to: Acme chatsessions" in out
    assert f"Callback URL: {URL}/webhooks/whatsapp — Verify token: the value of $WHATSAPP_VERIFY_TOKEN" in out
    assert "subscribe to messages" in out
    assert ENV["WHATSAPP_VERIFY_TOKEN"] not in out and WA_TOKEN not in out
    code, out = setup(capsys, "whatsapp", "--url", URL, "--show-secrets")
    assert code == 0 and f"Verify token: {ENV['WHATSAPP_VERIFY_TOKEN']} (from $WHATSAPP_VERIFY_TOKEN)" in out


def test_whatsapp_refusals_of_the_token_and_the_number_are_explained(configured, standin, capsys, monkeypatch):
    standin.accounts.whatsapp_number(WA_TOKEN, WA_NUMBER, WA_ACCOUNT)
    monkeypatch.setenv("WHATSAPP_ACCESS_TOKEN", "EAAG-expired")
    code, out = setup(capsys, "whatsapp", "--url", URL)
    assert code == 2 and "HTTP 401: the credentials were refused (Invalid OAuth access token" in out
    assert "Meta refused the access token in $WHATSAPP_ACCESS_TOKEN" in out and "EAAG-expired" not in out

    monkeypatch.setenv("WHATSAPP_ACCESS_TOKEN", WA_TOKEN)
    configured.write_text(configured.read_text().replace(WA_NUMBER, "106540399999999"))
    code, out = setup(capsys, "whatsapp", "--url", URL)
    assert code == 2 and "HTTP 400 (Unsupported get request. Object with ID '106540399999999' does not exist" in out
    assert "Meta knows no phone number id 106540399999999 for this token" in out

    configured.write_text(configured.read_text().replace('phone_number_id = "106540399999999"', 'phone_number_id = ""'))
    code, out = setup(capsys, "whatsapp", "--url", URL)
    assert code == 2 and "options.phone_number_id is empty" in out


def test_whatsapp_without_permission_to_subscribe_prints_the_manual_step(configured, standin, capsys):
    number = standin.accounts.whatsapp_number(WA_TOKEN, WA_NUMBER, WA_ACCOUNT, can_manage=False)
    configured.write_text(configured.read_text().replace('business_account_id = ""',
                                                         f'business_account_id = "{WA_ACCOUNT}"'))
    code, out = setup(capsys, "whatsapp", "--url", URL)
    assert code == 0, out
    assert "the token may not subscribe the app ((#200) Requires whatsapp_business_management permission" in out
    assert f"send POST /{WA_ACCOUNT}/subscribed_apps from the Graph API Explorer" in out
    assert not number.subscribed


def test_whatsapp_account_that_cannot_be_discovered_is_asked_for(configured, standin, capsys):
    standin.accounts.whatsapp_number(WA_TOKEN, WA_NUMBER, WA_ACCOUNT, can_manage=False)
    code, out = setup(capsys, "whatsapp", "--url", URL)
    assert code == 0 and "the token names no WhatsApp Business Account it may manage" in out
    assert "Set options.business_account_id" in out


# --------------------------------------------------------------------------------------------------------------------
# Discord


def test_discord_setup_registers_the_commands_the_ingress_answers(configured, standin, capsys):
    app = standin.accounts.discord_app(DC_TOKEN, DC_APP, "acmebot", DC_KEY)
    code, out = setup(capsys, "discord", "--url", URL)
    assert code == 0, out
    assert "registered /new, /ask" in out and "the Message Content intent is on" in out
    assert [c["name"] for c in app.commands] == ["new", "ask"]
    assert f"Interactions Endpoint URL: {URL}/webhooks/discord/interactions" in out
    assert f"client_id={DC_APP}&scope=bot+applications.commands&permissions=274877910016" in out
    assert "GUILD_MESSAGES, DIRECT_MESSAGES, MESSAGE_CONTENT" in out and "chatsessions gateway discord" in out
    # What Discord sends for each registered command is a turn of the channel.
    channel = DiscordChannel(load_settings().channel("discord"))
    for n, command in enumerate(app.commands):
        options = [{"name": o["name"], "type": o["type"], "value": "where is my order?"} for o in command["options"]]
        interaction = {"type": 2, "id": str((1 << 40) + n), "channel_id": "1290000000000000001",
                       "user": {"id": "402922222222222222", "username": "farid"},
                       "data": {"name": command["name"], "options": options}}
        answer, [turn] = channel.interaction(json.dumps(interaction).encode())
        assert answer["type"] == 4 and turn.text in ("/new", "where is my order?")
    assert [c["name"] for c in APPLICATION_COMMANDS] == ["new", "ask"]


def test_discord_refusals_and_a_foreign_public_key_are_explained(configured, standin, capsys, monkeypatch):
    app = standin.accounts.discord_app(DC_TOKEN, DC_APP, "acmebot", "ab" * 32)
    code, out = setup(capsys, "discord", "--url", URL)
    assert code == 2 and "$DISCORD_PUBLIC_KEY is not this application's public key" in out
    assert f"General Information: {'ab' * 32}" in out and app.commands == []

    monkeypatch.setenv("DISCORD_BOT_TOKEN", "reset-token")
    code, out = setup(capsys, "discord", "--url", URL)
    assert code == 2 and "HTTP 401: the credentials were refused (401: Unauthorized)" in out
    assert "Discord refused the bot token in $DISCORD_BOT_TOKEN" in out and "reset-token" not in out


def test_discord_application_id_must_be_the_bots(configured, standin, capsys):
    standin.accounts.discord_app(DC_TOKEN, DC_APP, "acmebot", DC_KEY)
    configured.write_text(configured.read_text().replace('# options = { application_id = "..." }',
                                                         'options = { application_id = "1300000000000000999" }'))
    code, out = setup(capsys, "discord", "--url", URL)
    assert code == 2 and f'Set application_id = "{DC_APP}"' in out


def test_discord_settings_already_made_are_confirmed_and_missing_ones_listed(configured, standin, capsys):
    standin.accounts.discord_app(DC_TOKEN, DC_APP, "acmebot", DC_KEY, flags=0,
                                 interactions_endpoint_url=f"{URL}/webhooks/discord/interactions")
    configured.write_text(configured.read_text().replace('platform = "discord"\n',
                                                         'platform = "discord"\nsession = { threads = false }\n'))
    code, out = setup(capsys, "discord", "--url", URL)
    assert code == 0, out
    assert f"ok    interactions  Discord sends interactions to {URL}/webhooks/discord/interactions" in out
    assert "GUILDS, GUILD_MESSAGES, DIRECT_MESSAGES, MESSAGE_CONTENT, but the Message Content intent is off" in out
    assert "turn on Message Content Intent" in out and "Interactions Endpoint URL:" not in out


# --------------------------------------------------------------------------------------------------------------------
# Web chat, and what every platform shares


def test_webchat_setup_prints_the_page(configured, capsys, monkeypatch):
    code, out = setup(capsys, "webchat", "--url", URL)
    assert code == 0 and f"ok    page          {URL}/chat/webchat" in out and "cookies" not in out
    monkeypatch.setenv("BROKER_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("SECRET_KEY", "k" * 32)
    code, out = setup(capsys, "webchat", "--url", "http://10.0.0.5:8000")
    assert code == 0 and "the visitor cookie is Secure" in out and "the ingress, workers and beat" in out


def test_an_unknown_channel_or_config_error_is_a_usage_error(configured, capsys, monkeypatch):
    code, out = setup(capsys, "nope", "--url", URL)
    assert code == 2 and "no channel 'nope'" in out and "channels: telegram, whatsapp, discord, webchat" in out
    monkeypatch.delenv("DISCORD_PUBLIC_KEY")
    code, out = setup(capsys, "telegram", "--url", URL)
    assert code == 2 and "environment variable DISCORD_PUBLIC_KEY (secrets.public_key) is not set" in out
