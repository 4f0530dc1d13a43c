"""The one family of errors the shim and the bundler raise; messages say what, where, expected vs actual, what to do."""

from __future__ import annotations


class BundleError(Exception):
    """Base class: something about a bundle, a model or this machine is not as expected.

    ``hint`` says what the user can do next; the CLI prints it after the message.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ManifestError(BundleError):
    """manifest.json (or a part manifest) is malformed, of an unknown schema, or inconsistent."""


class SchemaVersionError(ManifestError):
    """The manifest was written by a newer, incompatible major schema version."""


class IntegrityError(BundleError):
    """A file's size or sha256 differs from what the manifest pins (tampered, truncated, missing, extra)."""


class ModelError(BundleError):
    """The ONNX model cannot be read or bundled as it is."""


class EngineBuildError(BundleError):
    """TensorRT for RTX refused to parse or build the model."""


class ArchiveError(BundleError):
    """A bundle archive is corrupt or holds entries that would escape the target directory."""


class MachineError(BundleError):
    """This machine cannot do what was asked (no supported GPU, old driver, ...)."""


class InputError(BundleError):
    """Inputs given to ``Session.run`` do not match the bundle's inputs or profiles."""


class BackendUnavailableError(BundleError):
    """No backend can serve this bundle on this machine (TRT-RTX cannot, and no fallback allowed)."""


class CacheError(BundleError):
    """The user cache directory cannot be used (lock timeout, permissions)."""


class ModelChoiceError(BundleError):
    """The bundle holds several models and none was named, or none has the name given."""


class SignatureError(BundleError):
    """The bundle's signature (manifest.sig) is missing, corrupt, made by another key, or no longer covers manifest.json."""


class DeltaError(ArchiveError):
    """An update file (.trtxd) is corrupt, truncated or hostile, or was made for another bundle than the one given."""
