"""A session's transcript as text (used by `sessions show` and the demo)."""

from __future__ import annotations

from shared.transcripts import transcript


def format_transcript(key: str, url: str) -> str:
    found = transcript(url, key)
    if found is None:
        raise LookupError(f"no session {key!r}")
    summary, lines = found
    out = [f"session {summary.key}  [{summary.status}, generation {summary.generation}]"]
    for line in lines:
        at = line.at.strftime("%H:%M:%S")
        if line.kind == "event":
            out.append(f"  {at}  -- {line.text} (generation {line.generation})")
        elif line.kind == "user":
            out.append(f"  {at}  g{line.generation} {line.sender_name}: {line.text}")
        else:
            status = f"  [{line.delivery_status}]" if line.delivery_status != "sent" else ""
            if line.delivery_status == "failed" and line.delivery_error:
                status = f"  [failed: {line.delivery_error}]"
            out.append(f"  {at}  g{line.generation}   Agent: {line.text}{status}")
    return "\n".join(out)
