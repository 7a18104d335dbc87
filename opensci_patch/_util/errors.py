"""Error types. Each message says what went wrong and what to do; the CLI prints it as one line."""


class OpensciPatchError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code = 2


class ModelDirError(OpensciPatchError):
    """The given path is not a usable model directory (missing, no config.json, corrupt weights...)."""


class PatchError(OpensciPatchError):
    """A patch that is needed could not be applied or did not verify."""


class DestinationError(OpensciPatchError):
    """The output location exists and was not created by us (use --force), or cannot be written."""


class CaptureError(OpensciPatchError):
    """Capture input is unusable (e.g. the target token is not a single token)."""


class EnvironmentSetupError(OpensciPatchError):
    """A per-release environment could not be created or installed."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C: every cleanup that runs after Ctrl-C runs (temp dirs, partial outputs, locks)."""


def exit_status(exc: OpensciPatchError | KeyboardInterrupt) -> tuple[int, str]:
    """(exit code, what to print on stderr) for an error the CLI and the worker turn into a status: the error's
    own code and line, 143 after SIGTERM (`Terminated`), 130 after Ctrl-C."""
    if isinstance(exc, OpensciPatchError):
        return exc.exit_code, format_error(exc)
    return (143, "opensci-patch: error: terminated") if isinstance(exc, Terminated) else (
        130, "opensci-patch: error: interrupted")  # fmt: skip


def format_error(exc: OpensciPatchError) -> str:
    """What the CLI prints for `exc` on stderr: one line; the rest (a log tail, a diff) only when asked for."""
    import os

    first, *detail = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    text = f"opensci-patch: error: {first}"
    if detail and os.environ.get("OPENSCI_PATCH_VERBOSE"):
        text += "\n" + "\n".join(detail)
    elif detail:
        text += f"\n  ({len(detail)} more line(s) of detail: set OPENSCI_PATCH_VERBOSE=1)"
    return text
