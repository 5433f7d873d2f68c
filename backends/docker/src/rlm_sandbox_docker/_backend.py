"""The ``docker`` backend: one locked-down, long-lived container per sandbox.

The container's PID 1 is ``docker-init`` + ``sleep`` running as an unprivileged uid (65534). The
runtime is exec'd into it as a *different* non-root uid (10001) over one exec socket, so a kill of
every process of the runtime's uid (``kill -9 -1``) stops the runtime's whole tree and never the
container. Root filesystem read-only, all capabilities dropped, no-new-privileges, no network
unless asked, memory / CPU / pids from cgroups, a size-limited tmpfs work dir.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from rlm_sandbox import (
    BackendConfig,
    Box,
    Channel,
    ConfigError,
    Limits,
    SandboxError,
    SandboxNotFound,
    SandboxStartError,
    SandboxTimeout,
    TransientSandboxError,
)
from rlm_sandbox._owner import owner_labels
from rlm_sandbox._sandbox import Blob, runtime_sha256

from ._channel import DockerExecChannel

__all__ = ["DockerBox", "DockerConfig", "Mount"]

log = logging.getLogger("rlm_sandbox.docker")

#: Host temp dirs bind-mounted read-only for uploads (with an ``.owner.json`` beside each).
UPLOAD_PREFIX = "rlm-sandbox-docker-"
#: Where the image recipe bakes the runtime, and the label that says which runtime it is.
BAKED_RUNTIME = "/opt/rlm-sandbox/runtime.py"
RUNTIME_LABEL = "org.rlm-sandbox.runtime-sha256"
_baked_cache: dict[str, bool] = {}


class Mount(BaseModel):
    """A host path or named volume mounted into the sandbox."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    """Host path (bind) or volume name."""
    target: str
    """Path inside the sandbox."""
    read_only: bool = True
    """Mounted read-only unless you say otherwise."""


@contextlib.contextmanager
def translate_docker_errors(what: str) -> Iterator[None]:
    """Map docker-py / requests errors into the rlm_sandbox tree, at the boundary."""
    import docker.errors
    import requests

    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise SandboxStartError(
            f"{what}: image not found ({exc.explanation}). Build it with `rlm-sandbox image build`."
        ) from exc
    except docker.errors.NotFound as exc:
        raise SandboxNotFound(f"{what}: {exc.explanation or exc}") from exc
    except docker.errors.APIError as exc:
        status = exc.status_code or 0
        if status >= 500 or status == 429:
            raise TransientSandboxError(f"{what}: {exc.explanation or exc}") from exc
        raise SandboxError(f"{what}: {exc.explanation or exc}") from exc
    except docker.errors.DockerException as exc:
        raise SandboxStartError(f"{what}: {exc}") from exc
    except requests.exceptions.Timeout as exc:
        raise SandboxTimeout(f"{what}: the Docker engine did not answer in time") from exc
    except requests.exceptions.ConnectionError as exc:
        raise TransientSandboxError(f"{what}: cannot reach the Docker engine ({exc})") from exc


class DockerConfig(BackendConfig):
    """Config of the ``docker`` backend (``pip install "rlm-sandbox[docker]"``)."""

    backend: ClassVar[str] = "docker"
    install_hint: ClassVar[str] = "rlm-sandbox[docker]"

    image: str = "rlm-sandbox:latest"
    """Any image with ``python3`` (3.8+). Build the default one with ``rlm-sandbox image build``."""
    base_url: str | None = None
    """Docker engine URL (``unix://...``, ``tcp://host:2376``; not ``ssh://`` yet); default:
    ``DOCKER_HOST`` or the local socket."""
    tls: bool = False
    """Use TLS to the engine (with ``DOCKER_CERT_PATH`` / ``DOCKER_TLS_VERIFY`` as docker does)."""
    user: str = "10001:10001"
    """uid:gid that runs the runtime and user code. Must differ from ``init_user``."""
    init_user: str = "65534:65534"
    """uid:gid of the container's PID 1 (an idle ``sleep``)."""
    python: str = "python3"
    """The interpreter inside the image."""
    workdir: str = "/work"
    """The writable work directory (a tmpfs) and the cwd of user code."""
    work_size_mb: int | None = None
    """Size of the tmpfs work dir; default ``Limits.disk_mb``, else half the memory limit. It
    counts against the memory limit."""
    default_pids: int = Field(default=512, gt=0)
    """pids limit applied when ``Limits.pids`` is None (fork bombs are always bounded)."""
    network_name: str | None = None
    """Docker network to attach when ``Limits(network=True)`` (default: the engine's default)."""
    mounts: tuple[Mount, ...] = ()
    """Extra mounts (read-only unless said otherwise)."""
    runtime: str | None = None
    """OCI runtime, e.g. ``"runsc"`` for gVisor."""
    upload_mount: bool | None = None
    """Pass large uploads (contexts) through a read-only bind mount of a host temp dir. Default:
    on for a local engine (unix socket), off for a remote one (uploads then stream over the
    exec socket)."""
    request_timeout_s: float = Field(default=60.0, gt=0)
    """Timeout of one call to the Docker engine."""

    def create_box(self, limits: Limits) -> Box:
        return DockerBox(self, limits)

    def client(self) -> Any:
        """A docker-py client for this config's engine."""
        import docker

        with translate_docker_errors("connecting to the Docker engine"):
            if self.base_url is None:
                return docker.from_env(timeout=int(self.request_timeout_s))
            tls: Any = False
            if self.tls:
                tls = docker.tls.TLSConfig(verify=True) if os.environ.get("DOCKER_TLS_VERIFY") else True
            return docker.DockerClient(
                base_url=self.base_url, timeout=int(self.request_timeout_s), tls=tls, use_ssh_client=False
            )

    def check(self) -> str | None:
        try:
            client = self.client()
            try:
                client.ping()
                client.images.get(self.image)
            finally:
                client.close()
        except SandboxError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - any engine problem means not usable
            name = type(exc).__name__
            if name == "ImageNotFound":
                return f"image {self.image} not found: build it with `rlm-sandbox image build`"
            return f"{name}: {exc}"
        return None

    def gc(self, *, older_than_s: float | None = None, dry_run: bool = False, all_hosts: bool = False) -> list[str]:
        """Remove containers whose owning process is gone (or older than ``older_than_s``)."""
        from ._gc import collect

        return collect(self, older_than_s=older_than_s, dry_run=dry_run, all_hosts=all_hosts)


class DockerBox(Box):
    """One container."""

    def __init__(self, config: DockerConfig, limits: Limits) -> None:
        super().__init__()
        if config.user.split(":")[0] == config.init_user.split(":")[0]:
            raise ConfigError("user and init_user must be different uids (the runtime's kill would stop PID 1)")
        self.config = config
        self.python = config.python
        self.workdir = config.workdir
        self.statedir = config.workdir.rstrip("/") + "/.rlm"
        # reset() empties these too: a pooled sandbox's next user must not find the last one's files.
        self.runtime_options = {"oom_detect": True, "rlimits": {}, "tmpdir": "/tmp", "scratch_dirs": ["/dev/shm"]}
        if limits.file_size_mb is not None:
            self.runtime_options["rlimits"]["file_size_bytes"] = limits.file_size_mb << 20
        if limits.cpu_time_s is not None:
            self.runtime_options["rlimits"]["cpu_time_s"] = limits.cpu_time_s
        self._channel: DockerExecChannel | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._stderr_tail = bytearray()
        self._upload_dir: str | None = None
        self._mounted_dir = ""
        self.client = config.client()
        try:
            self._container = self._create(limits)
        except BaseException:
            self._cleanup_host_side()
            raise
        self.id = self._container.id[:12]
        if self._image_has_our_runtime():
            self.baked_runtime = BAKED_RUNTIME

    # ---- creation ---------------------------------------------------------------------------

    def _image_has_our_runtime(self) -> bool:
        """Whether the image carries this exact runtime (its sha256 label), cached per image id."""
        image_id = self._container.attrs.get("Image", "")
        if image_id not in _baked_cache:
            try:
                labels = self.client.images.get(image_id).labels or {}
            except Exception:  # noqa: BLE001 - without the label the source is simply sent
                labels = {}
            _baked_cache[image_id] = labels.get(RUNTIME_LABEL) == runtime_sha256()
        return _baked_cache[image_id]

    def _local_engine(self) -> bool:
        url = self.config.base_url or os.environ.get("DOCKER_HOST", "unix://")
        return url.startswith(("unix://", "npipe://")) or url == ""

    def _create(self, limits: Limits) -> Any:
        cfg = self.config
        mem = (limits.memory_mb or 0) << 20
        work_mb = cfg.work_size_mb or limits.disk_mb or (max((limits.memory_mb or 2048) // 2, 64))
        uid, _, gid = cfg.user.partition(":")
        tmpfs = {
            cfg.workdir: f"rw,exec,nosuid,nodev,size={work_mb}m,uid={uid},gid={gid or uid},mode=0700",
            "/tmp": "rw,nosuid,nodev,size=64m,mode=1777",
        }
        volumes: dict[str, dict[str, str]] = {}
        for m in cfg.mounts:
            volumes[m.source] = {"bind": m.target, "mode": "ro" if m.read_only else "rw"}
        use_upload = cfg.upload_mount if cfg.upload_mount is not None else self._local_engine()
        if use_upload:
            # The sandbox user (another uid) must read the files, so they are world-readable; the
            # outer dir is 0711 (no listing) and the mounted one has an unguessable name, so other
            # users of the host cannot find them.
            self._upload_dir = tempfile.mkdtemp(prefix=UPLOAD_PREFIX)
            os.chmod(self._upload_dir, 0o711)
            self._mounted_dir = os.path.join(self._upload_dir, secrets.token_hex(16))
            os.mkdir(self._mounted_dir, 0o755)
            # Next to (not in) the mounted dir: the reaper removes it if this process dies.
            with open(self._upload_dir + ".owner.json", "w") as f:
                json.dump(owner_labels(limits.lifetime_s), f)
            volumes[self._mounted_dir] = {"bind": "/rlm-upload", "mode": "ro"}
        # PID 1 idles; with a lifetime it exits when the lifetime ends, which stops the container.
        life = "infinity" if limits.lifetime_s is None else str(int(limits.lifetime_s))
        kwargs: dict[str, Any] = dict(
            image=cfg.image,
            command=["sleep", life],
            detach=True,
            init=True,
            auto_remove=True,
            user=cfg.init_user,
            read_only=True,
            tmpfs=tmpfs,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=limits.pids or cfg.default_pids,
            labels=owner_labels(limits.lifetime_s, self.config.labels),
            volumes=volumes or None,
            working_dir=cfg.workdir,
            environment={},
        )
        if mem:
            kwargs.update(mem_limit=mem, memswap_limit=mem)
        if limits.cpus is not None:
            kwargs["nano_cpus"] = int(limits.cpus * 1e9)
        if limits.network:
            if cfg.network_name:
                kwargs["network"] = cfg.network_name
        else:
            kwargs["network_disabled"] = True
        if cfg.runtime:
            kwargs["runtime"] = cfg.runtime
        with translate_docker_errors(f"starting a container from {cfg.image}"):
            return self.client.containers.run(**kwargs)

    # ---- the Box interface -----------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {
            "HOME": self.workdir,
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
        }
        env.update(self.config.passthrough_env(dict(os.environ)))
        return env

    def _on_stderr(self, data: bytes) -> None:
        self._stderr_tail += data
        del self._stderr_tail[:-8192]

    def launch(self, argv: Sequence[str]) -> Channel:
        with translate_docker_errors("starting the runtime in the container"):
            channel = DockerExecChannel.start(
                self.client,
                self._container,
                list(argv),
                user=self.config.user,
                workdir=self.workdir,
                environment=self._env(),
                on_stderr=self._on_stderr,
            )
        self._channel = channel
        return channel

    def kill_runtime(self) -> None:
        channel = self._channel
        if channel is None:
            return
        with contextlib.suppress(Exception):
            channel.kill()
        with contextlib.suppress(Exception):
            channel.close()

    def upload(self, path: str, data: Blob) -> str | None:
        # Only contexts (hidden upload names) go through the bind mount: other files belong in /work.
        if self._upload_dir is None or not path.startswith(".rlm-upload-"):
            return None
        target = os.path.join(self._mounted_dir, path)
        with open(target + ".part", "wb") as f:
            for chunk in data.chunks():
                f.write(chunk)
        os.chmod(target + ".part", 0o644)
        os.replace(target + ".part", target)
        return "/rlm-upload/" + path

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._channel is not None:
            with contextlib.suppress(Exception):
                self._channel.close()
        import docker.errors

        try:
            self._container.kill()
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):
                with contextlib.suppress(Exception):
                    self._container.remove(force=True)
        except Exception as exc:  # noqa: BLE001 - close() never raises; gc finds it by its labels
            log.warning("could not remove container %s (the reaper will): %s", self.id, exc)
        finally:
            self._cleanup_host_side()
            with contextlib.suppress(Exception):
                self.client.close()

    def _cleanup_host_side(self) -> None:
        if self._upload_dir is not None:
            shutil.rmtree(self._upload_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(self._upload_dir + ".owner.json")
            self._upload_dir = None

    @property
    def container(self) -> Any:
        """The docker-py ``Container``."""
        return self._container

    def stderr_tail(self) -> bytes:
        """The last bytes the runtime wrote to its stderr (diagnostics)."""
        return bytes(self._stderr_tail)


def build_image(
    *,
    tag: str = "rlm-sandbox:latest",
    base: str = "python:3.12-slim",
    config: DockerConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Build the default sandbox image (the Dockerfile shipped with this package)."""
    import io
    import tarfile
    from importlib import resources
    from pathlib import Path

    import rlm_sandbox.runtime as rt

    dockerfile = resources.files("rlm_sandbox_docker").joinpath("Dockerfile").read_bytes()
    runtime = Path(rt.__file__).read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("Dockerfile", dockerfile), ("rlm_sandbox/runtime.py", runtime)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    cfg = config or DockerConfig()
    client = cfg.client()
    try:
        with translate_docker_errors(f"building {tag}"):
            stream = client.api.build(
                fileobj=buf,
                custom_context=True,
                tag=tag,
                buildargs={"BASE": base, "RUNTIME_SHA256": runtime_sha256()},
                rm=True,
                decode=True,
                pull=False,
            )
            image_id = ""
            for chunk in stream:
                if "error" in chunk:
                    raise SandboxError(f"building {tag}: {chunk['error']}")
                text = chunk.get("stream", "")
                if text and progress is not None:
                    progress(text.rstrip("\n"))
                aux = chunk.get("aux")
                if isinstance(aux, dict) and "ID" in aux:
                    image_id = str(aux["ID"])
        return image_id or tag
    finally:
        client.close()
