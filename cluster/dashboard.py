"""What longtail tells a user about the Ray dashboard: how to get in, and where the campaign is there.

Ray 2.60 protects the dashboard with a token (token authentication is on by default for a cluster
that ray.init() or longtail starts): the browser asks for it once. It lives in ~/.ray/auth_token
(or $RAY_AUTH_TOKEN_PATH / $RAY_AUTH_TOKEN) on the machine that started the head, and
`ray get-auth-token` prints it there.
"""

from __future__ import annotations

import os
from pathlib import Path

TASK_BAR_NOTE = ("the job page's task bar counts the packed calls dispatched so far, not the campaign's runs: "
                 "the campaign's progress is the 'runs N/M' lines of the job's driver log")


def token_location() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")


def auth_disabled() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled"


def sign_in() -> str:
    """One sentence: how to get past the dashboard's login prompt."""
    if auth_disabled():
        return "no token needed (RAY_AUTH_MODE=disabled)"
    return f"sign in with the token in {token_location()} (`ray get-auth-token` prints it)"


def url_line(url: str) -> str:
    """Every message that shows the dashboard's address says how to get in."""
    return f"Ray dashboard at {url}; {sign_in()}"


def where_to_look(url: str, submission_id: str, campaign: str) -> list[str]:
    """Printed when a campaign's job starts: the job page, and what on it is the campaign's progress."""
    return [url_line(url),
            f"campaign {campaign!r} runs as job {submission_id}: Jobs > {submission_id} shows its driver log "
            f"with the progress lines (runs done/planned, rate, ETA, failures, retries)",
            f"note: {TASK_BAR_NOTE}"]
