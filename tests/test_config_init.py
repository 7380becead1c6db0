"""`chatsessions config init`: a commented channels file for the platforms asked for, which `load_settings` (and so
`chatsessions check`) accepts once the variables it names are set."""

from __future__ import annotations

import re

import pytest

from cli.main import main
from shared.config import load_settings
from shared.errors import ConfigError

ENV = {"TELEGRAM_BOT_TOKEN": "424242:AAH-good-token", "DISCORD_BOT_TOKEN": "dc-bot-token",
       "DISCORD_PUBLIC_KEY": "de18658095d004b28d2eb7638b14aac7ce85ed7567e7839fe81df237691194e8"}


def test_config_init_writes_a_file_check_accepts_once_the_variables_are_set(tmp_path, capsys):
    path = tmp_path / "channels.toml"
    assert main(["config", "init", "--out", str(path), "--agent", "echo", "--platform", "discord",
                 "--platform", "telegram", "--platform", "discord"]) == 0
    out = capsys.readouterr().out
    assert "channels discord, telegram" in out
    assert [line.split("=")[0] for line in re.findall(r"export (\S+)", out)] == [
        "CHATSESSIONS_CONFIG", "DISCORD_BOT_TOKEN", "DISCORD_PUBLIC_KEY", "TELEGRAM_BOT_TOKEN",
        "TELEGRAM_SECRET_TOKEN"]
    secret = re.search(r"export TELEGRAM_SECRET_TOKEN=(\S+)", out).group(1)
    env = {"CHATSESSIONS_CONFIG": str(path), **ENV, "TELEGRAM_SECRET_TOKEN": secret}
    settings = load_settings(env)
    assert [(c.id, c.platform, c.agent) for c in settings.channels.values()] == [
        ("discord", "discord", "echo"), ("telegram", "telegram", "echo")]
    with pytest.raises(ConfigError, match="DISCORD_BOT_TOKEN"):
        load_settings({k: v for k, v in env.items() if k != "DISCORD_BOT_TOKEN"})

    path.write_text("# my channels\n")
    assert main(["config", "init", "--out", str(path), "--platform", "webchat"]) == 2
    assert "exists; --force replaces it" in capsys.readouterr().err and path.read_text() == "# my channels\n"
    assert main(["config", "init", "--out", str(path), "--platform", "webchat", "--force"]) == 0
    assert list(load_settings({"CHATSESSIONS_CONFIG": str(path)}).channels) == ["webchat"]


def test_config_init_needs_a_known_platform(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["config", "init", "--out", str(tmp_path / "c.toml"), "--platform", "icq"])
    assert exc.value.code == 2 and "invalid choice: 'icq'" in capsys.readouterr().err
    assert not (tmp_path / "c.toml").exists()
