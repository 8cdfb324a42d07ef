"""Policy texts shared by the tests: the story's ban in its variants."""

from __future__ import annotations

TIKTOK = "com.zhiliaoapp.musically"
TRILL = "com.ss.android.ugc.trill"


def tiktok_ban(
    action: str = "hold", *, phones_only: bool = True, state: str = "enforce", extra: str = ""
) -> str:
    """The story's ban; ``state`` is always written so tests can swap it for "retracted"."""
    scope = 'scope.device_class = ["mobile", "tablet"]\n' if phones_only else ""
    return (
        "\n[[policy]]\n"
        'id = "remove-tiktok"\n'
        f'match.apps_any = ["{TIKTOK}"]\n'
        f"{scope}"
        f'action = "{action}"\n'
        'message = "Remove TikTok."\n'
        f'state = "{state}"\n'
        f"{extra}"
    )
