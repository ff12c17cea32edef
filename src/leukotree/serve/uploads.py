"""Checking an upload before anything is stored: limits, zip archives, image formats.

Every file the client sends becomes one cell, refused or not: a file that is not an
image keeps its name with the reason (it is listed, never dropped); a case beyond the
limits (files, bytes, pixels) is refused as a whole with a 413 that names the limit.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import PurePath

from PIL import Image

from leukotree.data.images import IMAGE_SUFFIXES
from leukotree.serve.store import Upload

#: Suffixes given to stored files, by the format PIL reads from the bytes.
SUFFIX_OF = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif"}


class UploadRefused(Exception):
    """The upload breaks a limit; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one case may hold."""

    max_files: int = 2000
    max_bytes: int = 500 * 2**20
    max_pixels: int = 25_000_000


def expand(files: list[tuple[str, bytes]], limits: Limits) -> list[Upload]:
    """The uploads of a case: zip archives opened (their images, in order), every other
    file checked; raises :class:`UploadRefused` beyond a limit."""
    out: list[Upload] = []
    total = 0
    for name, data in files:
        total += len(data)
        if zipfile.is_zipfile(io.BytesIO(data)) and name.lower().endswith(".zip"):
            members, size = _zip_members(name, data, limits)
            total += size - len(data)
            out.extend(members)
        else:
            out.append(check_file(name, data, limits))
        if len(out) > limits.max_files:
            raise UploadRefused(413, f"The case holds more than {limits.max_files} files; "
                                     "split it or raise --max-files.")
        if total > limits.max_bytes:
            raise UploadRefused(413, f"The case holds more than {limits.max_bytes:,} bytes; "
                                     "split it or raise --max-bytes.")
    if not out:
        raise UploadRefused(422, "No files were uploaded; choose the cells of one patient.")
    return out


def _zip_members(name: str, data: bytes, limits: Limits) -> tuple[list[Upload], int]:
    archive = zipfile.ZipFile(io.BytesIO(data))
    infos = [i for i in archive.infolist() if not i.is_dir()]
    size = sum(i.file_size for i in infos)
    if len(infos) > limits.max_files or size > limits.max_bytes:
        raise UploadRefused(413, f"Archive '{name}' unpacks to {len(infos)} files and "
                                 f"{size:,} bytes, beyond the limits ({limits.max_files} "
                                 f"files, {limits.max_bytes:,} bytes).")
    out = []
    for info in sorted(infos, key=lambda i: i.filename):
        member = f"{name}/{info.filename}"
        if any(part.startswith(".") or part == "__MACOSX"
               for part in PurePath(info.filename).parts):
            out.append(Upload(member, b"", error="hidden file or archive metadata, not a cell"))
            continue
        out.append(check_file(member, archive.read(info), limits))
    return out, size


def check_file(name: str, data: bytes, limits: Limits) -> Upload:
    """An upload with the suffix its bytes call for, or with the reason it is not used."""
    if not data:
        return Upload(name, b"", error="the file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format, img.size
        except Image.DecompressionBombError:
            fmt, width, height = None, limits.max_pixels + 1, 1
        except Exception:  # PIL raises many types; the cell keeps the reason
            suffix = PurePath(name).suffix.lower()
            if suffix in IMAGE_SUFFIXES:  # named as an image: decoding will say what is wrong
                return Upload(name, data, ".jpg" if suffix == ".jpeg" else suffix)
            return Upload(name, b"", error="not an image file (JPEG, PNG, BMP or TIFF expected)")
    if width * height > limits.max_pixels:
        raise UploadRefused(413, f"'{name}' has {width}x{height} pixels, beyond the limit of "
                                 f"{limits.max_pixels:,}; send single-cell images.")
    if fmt not in SUFFIX_OF:
        return Upload(name, b"", error=f"format {fmt} is not read; convert it to PNG or JPEG")
    return Upload(name, data, SUFFIX_OF[fmt])
