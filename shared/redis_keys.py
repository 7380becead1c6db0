"""Every Redis key the system writes, in one place: what each holds and who writes it. Operators' commands (erase,
partitions, stuck) read the same keys through these functions, so no format is ever copied.

  seen:<channel>:<platform message id>   the ingress's dedupe of a platform message (`pending`, then `done`; 7 days)
  seq:<session key>                      the ingress's per-session sequence counter (30 days after its last number)
  delivered:<reply id>                   a send's outcome the database could not take yet (the delivery journal)
  webchat:<channel>:<visitor pseudonym>  a web chat visitor's reply box (a stream, 24 h after its last entry)
  rl:<channel>[:<chat>]                  outbound pacing buckets (per platform account, per chat)
  webchat-rl:<channel>[:v|a:<who>]       the web chat's inbound limits (per visitor, per address, per channel)
  admin-login:<address pseudonym>        failed session browser logins per client address
  unacked, unacked_index                 kombu's Redis transport: messages taken and not acknowledged (and filed by
                                         the ingress when it enqueues them)
"""

from __future__ import annotations

SEEN_PREFIX = "seen:"
SEQ_PREFIX = "seq:"
DELIVERED_PREFIX = "delivered:"
REPLY_BOX_PREFIX = "webchat:"
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"  # kombu's defaults (transport options unacked_key / _index_key)


def seen(channel_id: str, platform_message_id: str) -> str:
    return f"{SEEN_PREFIX}{channel_id}:{platform_message_id}"


def seq(session_key: str) -> str:
    return f"{SEQ_PREFIX}{session_key}"


def delivered(reply_id: int) -> str:
    return f"{DELIVERED_PREFIX}{reply_id}"


def reply_box(channel_id: str, chat_id: str) -> str:
    return f"{REPLY_BOX_PREFIX}{channel_id}:{chat_id}"


def pacing(channel_id: str, chat_id: str | None = None) -> str:
    return f"rl:{channel_id}" if chat_id is None else f"rl:{channel_id}:{chat_id}"


def webchat_limit(channel_id: str, kind: str | None = None, who: str | None = None) -> str:
    """kind "v" (a visitor) or "a" (an address), with its pseudonym; neither: the whole channel."""
    return f"webchat-rl:{channel_id}" if kind is None else f"webchat-rl:{channel_id}:{kind}:{who}"


def admin_login(address_pseudonym: str) -> str:
    return f"admin-login:{address_pseudonym}"
