"""The one error tree of builder.

Every failure the library reports is a :class:`BuilderError`. Only :mod:`builder.cli` turns them into
messages and exit codes; library code raises and never prints.

Tree::

    BuilderError                 stage, hint, log_tail
    ├── ConfigError              bad input: YAML, unknown key, wrong type, missing file   (exit 2)
    ├── ToolError                a required host tool failed (command, returncode, stderr tail)
    │   └── MissingToolError     a required host tool is not installed (tool, Debian package)
    ├── FetchError               mirror unreachable, HTTP error, short read
    │   └── OfflineError         offline (--offline), and what is needed is not in the cache
    ├── VerificationError        signature or checksum does not match (never retried silently)
    ├── LockError                lock file missing, stale or inconsistent
    │   └── MalformedLockError   not JSON, or breaks the lock schema (field named)        (exit 2)
    ├── InstallerError           no usable installer (kernel ABI without served module udebs, …)
    ├── MediaError               preseed ISO / initrd could not be built
    ├── GatewayError             the archive gateway could not start or serve
    ├── VmError                  QEMU/libvirt could not start, died, or did not stop
    ├── InstallError             debian-installer failed (failing step + last log lines)
    ├── SshError                 SSH did not come up, or the host key differs
    ├── ProvisionError           an Ansible task failed (host, task, message)
    ├── HostModuleError          the host-side DKMS module build failed (missing tool, package, compile)
    ├── ImageError               qemu-img create/convert/check failed
    ├── OutputError              publishing the artifacts failed
    └── VerifyError              the boot test of a published image failed
"""

from __future__ import annotations

from collections.abc import Sequence


class BuilderError(Exception):
    """Root of every error builder raises.

    ``stage`` names the pipeline stage (fetch, preseed, media, install, …) when known; ``hint`` tells the
    user what to do; ``log_tail`` carries the last lines of a relevant log.
    """

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
        hint: str | None = None,
        log_tail: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.stage = stage
        self.hint = hint
        self.log_tail = list(log_tail)

    def __str__(self) -> str:
        return self.message

    def describe(self) -> str:
        """A multi-line, human-readable description (message, hint, log tail)."""
        lines = [f"{self.stage}: {self.message}" if self.stage else self.message]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        if self.log_tail:
            lines.append("last log lines:")
            lines.extend(f"  | {line}" for line in self.log_tail)
        return "\n".join(lines)


class ConfigError(BuilderError):
    """Bad user input. ``problems`` lists every (path, message) found, not just the first."""

    exit_code = 2

    def __init__(self, message: str, *, problems: Sequence[tuple[str, str]] = (), **kw: object) -> None:
        self.problems = list(problems)
        if self.problems:
            message = message + "\n" + "\n".join(f"  {p}: {m}" if p else f"  {m}" for p, m in self.problems)
        super().__init__(message, **kw)  # type: ignore[arg-type]


class ToolError(BuilderError):
    """A host command is missing or exited non-zero."""

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        returncode: int | None = None,
        stderr_tail: Sequence[str] = (),
        **kw: object,
    ) -> None:
        self.command = list(command)
        self.returncode = returncode
        kw.setdefault("log_tail", list(stderr_tail))
        super().__init__(message, **kw)  # type: ignore[arg-type]


class MissingToolError(ToolError):
    """A host tool builder needs is not installed. ``package`` is the Debian package that provides it."""

    def __init__(self, tool: str, *, package: str | None = None, why: str | None = None, **kw: object) -> None:
        self.tool = tool
        self.package = package
        what = f"required tool not found: {tool}" + (f" ({why})" if why else "")
        kw.setdefault("hint", f"install it: apt-get install {package}" if package else None)
        super().__init__(what, command=[tool], **kw)  # type: ignore[arg-type]


class FetchError(BuilderError):
    """Downloading from the mirror failed."""


class OfflineError(FetchError):
    """Offline (``--offline``), and something the build needs is not in the cache. ``missing`` names each."""

    def __init__(self, message: str, *, missing: Sequence[str] = (), **kw: object) -> None:
        self.missing = list(missing)
        kw.setdefault("hint", "fill the cache first, online: python -m builder fetch IMAGE.yaml --all")
        super().__init__(message, **kw)  # type: ignore[arg-type]


class VerificationError(BuilderError):
    """A signature or checksum did not match. Nothing unverified is ever used."""


class LockError(BuilderError):
    """The lock file is missing, malformed or disagrees with the archive."""


class MalformedLockError(LockError):
    """The lock file is not JSON or breaks its schema. ``problems`` lists every (field, message) found."""

    exit_code = 2

    def __init__(self, message: str, *, problems: Sequence[tuple[str, str]] = (), **kw: object) -> None:
        self.problems = list(problems)
        if self.problems:
            message = message + "\n" + "\n".join(f"  {p}: {m}" if p else f"  {m}" for p, m in self.problems)
        super().__init__(message, **kw)  # type: ignore[arg-type]


class InstallerError(BuilderError):
    """No usable debian-installer could be selected."""


class MediaError(BuilderError):
    """Building the installer initrd or ISO failed."""


class GatewayError(BuilderError):
    """The archive gateway failed."""


class VmError(BuilderError):
    """A virtual machine could not be started, died unexpectedly or could not be stopped."""


class InstallError(BuilderError):
    """debian-installer failed. ``step`` is the d-i step that failed, when known."""

    def __init__(self, message: str, *, step: str | None = None, **kw: object) -> None:
        self.step = step
        super().__init__(message, **kw)  # type: ignore[arg-type]


class SshError(BuilderError):
    """SSH to the build VM did not come up in time, or its host key differs from the pinned one."""


class ProvisionError(BuilderError):
    """An Ansible task failed. ``host`` and ``task`` name it."""

    def __init__(self, message: str, *, host: str | None = None, task: str | None = None, **kw: object) -> None:
        self.host = host
        self.task = task
        super().__init__(message, **kw)  # type: ignore[arg-type]


class HostModuleError(BuilderError):
    """The DKMS module could not be built on the build host (:mod:`builder.hostmodule`). ``missing_tool``
    names the host program that is not installed when that is the cause (the build may then compile in the
    guest instead); ``log_tail`` carries the end of DKMS's make.log or of mmdebstrap's output."""

    def __init__(self, message: str, *, missing_tool: str | None = None, **kw: object) -> None:
        self.missing_tool = missing_tool
        super().__init__(message, **kw)  # type: ignore[arg-type]


class ImageError(BuilderError):
    """qemu-img failed."""


class OutputError(BuilderError):
    """Publishing the artifacts failed."""


class VerifyError(BuilderError):
    """The boot test of a published image failed."""
