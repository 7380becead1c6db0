"""What the load generator needs to know about each channel it drives, and which channels it can drive: those whose
api_base is a local stand-in (replies never go to a real platform) and, for Discord, whose signing key it holds."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # the heavy imports wait until a load runs: `chatsessions <anything>` builds the parser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ECHOING_AGENTS = ("echo", "cli.bench_agents:DemoEcho", "cli.bench_agents:SlowEcho")


@dataclass(frozen=True)
class Target:
    channel_id: str
    platform: str  # whatsapp | telegram | discord
    prefix: str  # the stand-in prefix its replies arrive under
    secrets: Mapping[str, str] = field(repr=False)
    options: Mapping[str, Any]
    agent: str
    discord_key: Ed25519PrivateKey | None = field(default=None, repr=False)


def discord_key_from_seed(seed_hex: str) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex))


def targets_from_settings(settings: Any, discord_key: Ed25519PrivateKey | None = None,
                          channels: Iterable[str] | None = None, platforms: Iterable[str] | None = None,
                          echoing: Iterable[str] = ECHOING_AGENTS,
                          ) -> tuple[list[Target], tuple[str, int] | None, list[str]]:
    """The channels loadgen can drive, the stand-in address their api_base points at, and warnings for the others.

    A channel is usable when its api_base is http://<local host>:<port>/<prefix> (a stand-in: never send load whose
    replies would go to a real platform) and, for Discord, when the signing key matches its public key. A channel
    whose agent is not among `echoing` (the Agents known to repeat the message) gets a warning.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cli.embedded import DEMO_DISCORD_SIGNING_SEED, DEMO_SECRETS

    wanted_channels = set(channels) if channels else None
    wanted_platforms = set(platforms) if platforms else None
    targets: list[Target] = []
    warnings: list[str] = []
    address: tuple[str, int] | None = None
    for cid, c in settings.channels.items():
        if wanted_channels is not None and cid not in wanted_channels:
            continue
        if wanted_platforms is not None and c.platform not in wanted_platforms:
            continue
        parts = urlsplit(c.api_base)
        path = [seg for seg in parts.path.split("/") if seg]
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost") or len(path) != 1:
            warnings.append(f"{cid}: api_base {c.api_base} is not a local stand-in (http://127.0.0.1:PORT/PREFIX); skipped")
            continue
        here = ("127.0.0.1", parts.port or 80)
        if address is not None and here != address:
            warnings.append(f"{cid}: api_base points at {here[0]}:{here[1]}, others at {address[0]}:{address[1]}; skipped")
            continue
        key = None
        if c.platform == "discord":
            key = discord_key
            if key is None and c.secrets["public_key"] == DEMO_SECRETS["ACME_DISCORD_PUBLIC_KEY"]:
                key = Ed25519PrivateKey.from_private_bytes(DEMO_DISCORD_SIGNING_SEED)
            public = key.public_key().public_bytes_raw().hex() if key else None
            if public != c.secrets["public_key"]:
                warnings.append(f"{cid}: no signing key for its public_key (--discord-key SEED_HEX); skipped")
                continue
        if c.agent not in echoing:
            warnings.append(f"{cid}: agent {c.agent!r} may not repeat the message text; replies it does not tag "
                            "count as lost (use agent = \"echo\")")
        address = here
        targets.append(Target(cid, c.platform, path[0], c.secrets, c.options, c.agent, key))
    return targets, address, warnings

