"""Ray settings that must be in the environment before `import ray`.

Local Ray clusters use token authentication by default (Ray >= 2.59), with the token in
~/.ray/auth_token; a driver *joining* a cluster sends it only when `RAY_AUTH_MODE=token`
is set when Ray is imported. So joining commands opt in when the token file exists and
the user has not chosen a mode.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["prepare_ray_auth"]


def prepare_ray_auth() -> None:
    """Use the local token for joining a cluster, unless RAY_AUTH_MODE is set already."""
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"
