"""The model repository on disk: Triton layout NAME/VERSION/model.onnx, plus single model files.

Reads directories only when a model is registered or first loaded, never per request.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from meshnode.errors import InvalidInput, ModelNotFound
from meshnode.storage.versions import CONFIG_FILE, read_config, served

MODEL_FILENAMES = ("model.onnx",)


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model version's files are: the version directory and the model file in it."""

    name: str
    version: str
    directory: Path
    model_file: Path
    config_override: str = ""  # the model's ModelConfig as JSON in place of its config.pbtxt; "" for none


def version_files(source: ModelSource) -> list[Path]:
    """The files of one version: a version directory's whole tree, or a single model file alone (its
    directory may hold anything, other models or a whole repository)."""
    directory = source.directory
    if source.model_file.parent != directory or not directory.name.isdigit():
        return [source.model_file]
    return directory_files(directory)


def directory_files(directory: Path) -> list[Path]:
    """Every file of a version directory's tree, sorted."""
    # The Python backend compiles model.py into __pycache__ beside it: Triton's output, not the model's.
    return [p for p in sorted(directory.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]


def files_bytes(source: ModelSource) -> int:
    """Bytes on disk of one version and its model's config.pbtxt; raises OSError when unreadable."""
    config = source.directory.parent / CONFIG_FILE
    total = config.stat().st_size if source.directory.name.isdigit() and config.is_file() else 0
    return total + sum(p.stat().st_size for p in version_files(source))


# The longest name of one file or directory most file systems take (NAME_MAX), in bytes.
NAME_MAX = 255


def resolve_storage_uri(uri: str) -> Path:
    """A plain path or file:// URI naming a model directory or a model file; InvalidInput names what is wrong."""
    if "://" in uri:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise InvalidInput(f"unsupported storage_uri scheme '{parsed.scheme}': use a path or file://")
        text = unquote(parsed.path)
    else:
        text = uri
    _check_path(text, "storage_uri")
    path = Path(text)
    if text.startswith("~"):
        try:
            path = path.expanduser()
        except RuntimeError:  # '~user' of no such user
            raise InvalidInput(f"storage_uri '{_clip(uri)}': no such user's home directory "
                               f"'{_clip(text.split('/')[0])}'") from None
    try:
        path = path.resolve()
        exists = path.exists()
    except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a path too long for the OS
        raise InvalidInput(f"storage_uri '{_clip(uri)}' cannot be read: {type(error).__name__}") from None
    if not exists:
        raise InvalidInput(f"storage_uri '{_clip(uri)}' does not exist")
    return path


def _check_path(path: str, what: str) -> None:
    """What a file system refuses in any path: a NUL byte, a file or directory name over NAME_MAX bytes."""
    if "\x00" in path:
        raise InvalidInput(f"{what} '{_clip(path)}' contains a NUL byte")
    for part in path.split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise InvalidInput(f"{what} '{_clip(path)}' has a name longer than {NAME_MAX} bytes: '{_clip(part)}'")


def _clip(text: str, limit: int = 200) -> str:
    """A client's text in a message: printable (NUL and control characters escaped) and at most `limit` long."""
    shown = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(text)} characters)"


def _version_dirs(model_dir: Path) -> dict[str, Path]:
    try:
        children = list(model_dir.iterdir())
    except OSError:
        return {}
    return {c.name: c for c in children if c.is_dir() and c.name.isdigit()}


def available_versions(storage: Path, config_override: str = "") -> list[str]:
    """The versions the model's version_policy serves (its config override's, else its config.pbtxt's),
    ascending; a single model file is version 1.

    Raises LoadFailed when the model's config is broken."""
    if storage.is_file():
        return ["1"]
    present = sorted(_version_dirs(storage), key=int)
    return served(read_config(storage, config_override).version_policy, present) if present else []


def model_source(name: str, storage: Path, version: str, config_override: str = "") -> ModelSource:
    """The files of one version; version '' means the newest the policy serves. Raises ModelNotFound for a
    version the policy does not serve, as Triton does."""
    if storage.is_file():
        if version not in ("", "1"):
            raise ModelNotFound.no_version(name, version)
        return ModelSource(name, "1", storage.parent, storage, config_override)
    versions = available_versions(storage, config_override)
    if not versions:
        raise ModelNotFound(f"Request for unknown model: '{name}' has no available versions")
    chosen = version or versions[-1]
    if chosen not in versions:
        raise ModelNotFound.no_version(name, version)
    directory = storage / chosen
    for filename in MODEL_FILENAMES:
        if (directory / filename).exists():
            return ModelSource(name, chosen, directory, directory / filename, config_override)
    # Missing file: the load reports it with the model's name, not this lookup.
    return ModelSource(name, chosen, directory, directory / MODEL_FILENAMES[0], config_override)


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def scan(self) -> dict[str, Path]:
        """Model directories at the top of the repository: a directory with a numeric version dir."""
        if not self.root.is_dir():
            return {}
        found: dict[str, Path] = {}
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and _version_dirs(child):
                found[child.name] = child
        return found

    def store_files(self, name: str, files: dict[str, bytes]) -> Path:
        """Write uploaded files ('1/model.onnx' -> bytes) under ROOT/NAME, atomically each.

        Every path is checked before anything is written; InvalidInput names the upload that is wrong."""
        check_model_name(name)
        _check_path(name, "model name")
        model_dir = self.root / name
        relatives = {relative: _safe_relative(relative) for relative in files}
        _check_no_clash(relatives)
        for relative, content in files.items():
            target = model_dir / relatives[relative]
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
            except (FileExistsError, NotADirectoryError):
                raise InvalidInput(f"upload 'file:{_clip(relative)}': a directory on its path is a file of an "
                                   f"earlier upload of model '{name}'") from None
            except OSError as error:
                if error.errno != errno.ENAMETOOLONG:
                    raise
                # The OS's message would show the store's own path: name the upload only.
                raise InvalidInput(f"upload 'file:{_clip(relative)}': its path is too long for the model store "
                                   f"of model '{name}'") from None
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(content)
                os.replace(tmp, target)
            except IsADirectoryError:
                Path(tmp).unlink(missing_ok=True)
                raise InvalidInput(f"upload 'file:{_clip(relative)}' is a directory of an earlier upload of model "
                                   f"'{name}'") from None
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return model_dir


def _safe_relative(relative: str) -> PurePosixPath:
    # Every upload path refused starts with Triton's words, which its clients look for.
    try:
        _check_path(relative, "upload path")
    except InvalidInput as error:
        raise InvalidInput(f"Invalid file path in load parameters: {error}") from None
    path = PurePosixPath(relative)
    if path.is_absolute() or not path.parts or any(p in ("..", "") for p in path.parts):
        raise InvalidInput(f"Invalid file path '{_clip(relative)}' in load parameters")
    return path


def _check_no_clash(relatives: dict[str, PurePosixPath]) -> None:
    """No upload's file is another upload's directory ('1/model.onnx' and '1/model.onnx/x')."""
    files = {path: relative for relative, path in relatives.items()}
    for relative, path in relatives.items():
        for parent in path.parents:
            if parent in files:
                raise InvalidInput(f"uploads 'file:{_clip(files[parent])}' and 'file:{_clip(relative)}' clash: "
                                   f"'{_clip(str(parent))}' cannot be both a file and a directory")


def check_model_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\x00" in name or len(name) > 253:
        raise InvalidInput(f"invalid model name '{_clip(name)}'")
