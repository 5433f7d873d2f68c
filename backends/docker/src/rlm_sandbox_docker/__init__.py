"""The Docker backend for rlm-sandbox: ``open_sandbox("docker", image=...)``."""

from __future__ import annotations

from ._backend import DockerBox, DockerConfig, Mount, build_image
from ._channel import DockerExecChannel
from ._gc import collect

__all__ = ["DockerBox", "DockerConfig", "DockerExecChannel", "Mount", "build_image", "collect"]
