"""Safe extraction of a model archive (.tar.gz, .tgz, .zip) into a directory of its own.

No member may land outside the target: absolute paths, '..', links pointing out, device files and FIFOs
are refused with an error naming the archive's URI and the member. tarfile's 'data' filter (PEP 706) makes
the checks for tar; zipfile has none that refuse (it rewrites bad names silently), so zip members are
checked here before anything is written. An absolute member name, which the filter would make relative, is
refused too: an archive that tries it is not a model.
"""

from __future__ import annotations

import gzip
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from meshnode.errors import LoadFailed

# What a broken archive raises while it is read: a bad header, a cut gzip stream, a bad zip directory.
CORRUPT = (tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error, gzip.BadGzipFile,
           zipfile.BadZipFile, zipfile.LargeZipFile)
_UNIX = 3  # zipfile.ZipInfo.create_system of an archive made on Unix


def extract(archive: Path, target: Path, shown_uri: str) -> Path:
    """Extracts `archive` into `target` (created) and returns the model in it: the single top-level
    directory an archive often wraps its content in (tar czf m.tgz mymodel/), a single model file, else
    `target` itself."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, target, shown_uri)
        else:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(target, filter=_tar_filter)
    except tarfile.FilterError as error:
        member = error.tarinfo.name if error.tarinfo is not None else "?"
        raise LoadFailed(f"storage_uri '{shown_uri}': unsafe archive member '{member}': {error}") from None
    except LoadFailed:
        raise
    except CORRUPT as error:
        raise LoadFailed(f"storage_uri '{shown_uri}': corrupt or truncated archive: "
                         f"{type(error).__name__}: {error}") from None
    return _model_root(target)


def _tar_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
    # The data filter would strip a leading '/' and extract the member anyway: an absolute name is refused.
    if member.name.startswith("/"):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, path)


def _extract_zip(archive: Path, target: Path, shown_uri: str) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            _check_zip_member(info, shown_uri)
        bad = zf.testzip()  # CRC of every member, before anything is written
        if bad is not None:
            raise LoadFailed(f"storage_uri '{shown_uri}': corrupt archive: member '{bad}' fails its CRC check")
        zf.extractall(target, members)


def _check_zip_member(info: zipfile.ZipInfo, shown_uri: str) -> None:
    name = info.filename
    path = PurePosixPath(name.replace("\\", "/"))
    # A Unix zip keeps the file's mode in the high 16 bits; a type of 0 (Python's own zips) is a plain file.
    kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == _UNIX else 0
    why = None
    if "\x00" in name:
        why = "a NUL byte in its name"
    elif path.is_absolute() or (path.parts and ":" in path.parts[0]):
        why = "an absolute path"
    elif ".." in path.parts:
        why = "a path outside the archive's directory ('..')"
    elif kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        why = "not a regular file or directory (a link or a device)"
    if why is not None:
        shown = name.encode("unicode_escape").decode("ascii")
        raise LoadFailed(f"storage_uri '{shown_uri}': unsafe archive member '{shown}': {why}")


def _model_root(target: Path) -> Path:
    children = [c for c in target.iterdir() if not c.name.startswith(".")]
    if len(children) == 1 and (children[0].is_file() or not children[0].name.isdigit()):
        return children[0]
    return target
