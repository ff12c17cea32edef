"""Checking an upload before anything is stored: limits, zip archives, image formats.

Every file the client sends becomes one cell, refused or not: a file that is not an
image keeps its name with the reason (it is listed, never dropped); a case beyond the
limits is refused as a whole with a 413 that names the limit, and a damaged archive
with a 422 that names the member and what is wrong.

The limits hold while the request streams in, so a refused upload is never held whole:

- the request body: at most ``max_bytes`` plus :func:`body_allowance` bytes of
  multipart framing (a larger ``Content-Length`` is refused before reading);
- files: at most ``max_files`` per case, counting the members of zip archives;
- bytes: at most ``max_file_bytes`` per file or archive member and ``max_bytes`` per
  case, counting what archives unpack to. A member's size is checked against its
  header before it is unpacked and again while it is unpacked, so a zip of a few
  hundred KB that unpacks to hundreds of MB is refused after at most one limit's worth;
- pixels: at most ``max_pixels`` per image, read from the image header (the error
  gives the image's real width and height).
"""

from __future__ import annotations

import io
import lzma
import re
import warnings
import zipfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import PurePath

from PIL import Image

from leukotree.data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES
from leukotree.serve.store import Upload
from leukotree.serve.texts import shown_name

#: Suffixes given to stored files, by the format PIL reads from the bytes.
SUFFIX_OF = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif"}
#: Form fields (not files) per upload, and bytes per field.
MAX_FIELDS, MAX_FIELD_BYTES = 16, 4096
#: Multipart framing allowed beyond ``max_bytes``: a fixed part plus this much per file.
FRAMING_BYTES, FRAMING_PER_FILE = 64 * 1024, 2048
CHUNK = 1 << 20
#: What unpacking a damaged member raises (bad CRC, truncated or invalid stream).
DAMAGED = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError, ValueError)


class UploadRefused(Exception):
    """The upload breaks a limit or cannot be read; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one case may hold."""

    max_files: int = 2000
    max_bytes: int = 500 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = 64 * 2**20


def body_allowance(limits: Limits) -> int:
    """Largest request body of an upload: ``max_bytes`` of files plus the framing
    (``FRAMING_BYTES + FRAMING_PER_FILE * max_files``)."""
    return limits.max_bytes + FRAMING_BYTES + FRAMING_PER_FILE * limits.max_files


def _too_many(limits: Limits) -> UploadRefused:
    return UploadRefused(413, f"The case holds more than {limits.max_files} files; split it "
                              "or raise --max-files.")


def _too_big(limits: Limits) -> UploadRefused:
    return UploadRefused(413, f"The case holds more than {limits.max_bytes:,} bytes; split "
                              "it or raise --max-bytes.")


def _file_too_big(name: str, size: int | None, limits: Limits) -> UploadRefused:
    found = f"holds {size:,} bytes" if size is not None else "is larger than"
    return UploadRefused(413, f"'{name}' {found}{',' if size is not None else ''} the limit "
                              f"of {limits.max_file_bytes:,} bytes per file; send single-cell "
                              "images or raise --max-file-bytes.")


class _FormReader:
    """python-multipart callbacks that keep the form's fields and files, and refuse a part
    as soon as it breaks a limit."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.fields: dict[str, str] = {}
        self.files: list[tuple[str, bytes]] = []
        self.n_fields = self.total = 0
        self._start_part()

    def _start_part(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.field, self.value, self.data = b"", b"", bytearray()
        self.name, self.filename = "", None

    def callbacks(self) -> dict:
        return {"on_header_field": self.header_field, "on_header_value": self.header_value,
                "on_header_end": self.header_end, "on_headers_finished": self.headers_finished,
                "on_part_data": self.part_data, "on_part_end": self.part_end}

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]
        if len(self.value) > MAX_FIELD_BYTES:
            raise UploadRefused(413, f"A part header is longer than {MAX_FIELD_BYTES:,} bytes.")

    def header_end(self) -> None:
        self.headers[self.field.lower()] = self.value
        self.field, self.value = b"", b""

    def headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, disposition = parse_options_header(self.headers.get(b"content-disposition"))
        self.name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        self.filename = None if filename is None else filename.decode("utf-8", "replace") \
            or "file"
        if self.filename is not None and len(self.files) >= self.limits.max_files:
            raise _too_many(self.limits)
        if self.filename is None:
            self.n_fields += 1
            if self.n_fields > MAX_FIELDS:
                raise UploadRefused(413, f"The upload has more than {MAX_FIELDS} form fields.")

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.data += data[start:end]
        if self.filename is None:
            if len(self.data) > MAX_FIELD_BYTES:
                raise UploadRefused(413, f"Form field '{self.name[:40]}' is longer than "
                                         f"{MAX_FIELD_BYTES:,} bytes.")
            return
        self.total += end - start
        if self.total > self.limits.max_bytes:
            raise _too_big(self.limits)
        if not self.filename.lower().endswith(".zip") and \
                len(self.data) > self.limits.max_file_bytes:
            raise _file_too_big(shown_name(self.filename), None, self.limits)

    def part_end(self) -> None:
        if self.filename is None:
            self.fields[self.name] = bytes(self.data).decode("utf-8", "replace")
        elif self.name == "files":
            self.files.append((self.filename, bytes(self.data)))
        self._start_part()


async def read_form(chunks: AsyncIterator[bytes], content_type: str | None,
                    content_length: str | None,
                    limits: Limits) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """The form fields and files of a ``multipart/form-data`` body, read as it streams:
    refused (:class:`UploadRefused`) as soon as it breaks a limit."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadRefused(415, "Send the case as multipart/form-data with one 'files' part "
                                 "per file (as the page and `curl -F files=@cell.png` do).")
    allowance = body_allowance(limits)
    if content_length is not None:
        if not content_length.isdigit():
            raise UploadRefused(400, f"Content-Length '{content_length[:40]}' is not a number.")
        if int(content_length) > allowance:
            raise UploadRefused(413, f"The upload is {int(content_length):,} bytes, more than "
                                     f"the {limits.max_bytes:,} bytes a case may hold; split "
                                     "it or raise --max-bytes.")
    reader = _FormReader(limits)
    parser = MultipartParser(boundary, reader.callbacks())
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > allowance:
                raise _too_big(limits)
            parser.write(chunk)
        parser.finalize()
    except UploadRefused:
        raise
    except Exception as err:  # python-multipart's parse errors
        raise UploadRefused(400, f"The multipart body cannot be parsed: {err}.") from err
    return reader.fields, reader.files


def expand(files: list[tuple[str, bytes]], limits: Limits) -> list[Upload]:
    """The uploads of a case: zip archives opened (their images, in order), every other
    file checked; raises :class:`UploadRefused` beyond a limit or for a damaged archive."""
    out: list[Upload] = []
    total = 0
    for raw_name, data in files:
        name = shown_name(raw_name)
        if name.lower().endswith(".zip") and zipfile.is_zipfile(io.BytesIO(data)):
            members, size = _zip_members(name, data, limits, len(out),
                                         limits.max_bytes - total)
            total += size
            out.extend(members)
        else:
            if len(data) > limits.max_file_bytes:
                raise _file_too_big(name, len(data), limits)
            total += len(data)
            out.append(check_file(name, data, limits))
        if len(out) > limits.max_files:
            raise _too_many(limits)
        if total > limits.max_bytes:
            raise _too_big(limits)
    if not out:
        raise UploadRefused(422, "No files were uploaded; choose the cells of one patient.")
    return out


def _zip_members(name: str, data: bytes, limits: Limits, n_before: int,
                 budget: int) -> tuple[list[Upload], int]:
    """The members of one archive, each read with its size checked while unpacking."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in archive.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise UploadRefused(422, f"Archive '{name}' is damaged ({err}); create it again.") \
            from err
    if n_before + len(infos) > limits.max_files:
        raise UploadRefused(413, f"Archive '{name}' holds {len(infos)} files; with the others "
                                 f"the case would hold more than {limits.max_files}. Split it "
                                 "or raise --max-files.")
    declared = sum(i.file_size for i in infos)
    if declared > budget:
        raise UploadRefused(413, f"Archive '{name}' unpacks to {declared:,} bytes; the case "
                                 f"may hold {limits.max_bytes:,} bytes. Split it or raise "
                                 "--max-bytes.")
    out, size = [], 0
    for info in sorted(infos, key=lambda i: i.filename):
        member = f"{name}/{shown_name(info.filename)}"
        if any(part.startswith(".") or part == "__MACOSX"
               for part in PurePath(info.filename).parts):
            out.append(Upload(member, b"", error="hidden file or archive metadata, not a cell"))
            continue
        content = _read_member(archive, info, member, limits, budget - size)
        size += len(content)
        out.append(check_file(member, content, limits))
    return out, size


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, member: str,
                 limits: Limits, budget: int) -> bytes:
    """One member's bytes, unpacked in chunks and refused past ``max_file_bytes`` or the
    case's remaining ``budget``; encrypted, damaged or oddly compressed members are
    refused with the reason."""
    if info.flag_bits & 0x1:
        raise UploadRefused(422, f"'{member}' is encrypted; the server cannot read it. Zip "
                                 "the cells without a password.")
    if info.file_size > limits.max_file_bytes:
        raise _file_too_big(member, info.file_size, limits)
    cap = min(limits.max_file_bytes, budget)
    parts, n = [], 0
    try:
        with archive.open(info) as handle:
            while chunk := handle.read(CHUNK):
                n += len(chunk)
                if n > cap:
                    raise (_file_too_big(member, None, limits) if cap == limits.max_file_bytes
                           else _too_big(limits))
                parts.append(chunk)
    except NotImplementedError as err:
        raise UploadRefused(422, f"'{member}' uses a compression the server cannot unpack "
                                 f"(method {info.compress_type}: {err}); zip it again with "
                                 "ordinary (deflate) compression.") from err
    except RuntimeError as err:  # zipfile: encrypted, password required
        raise UploadRefused(422, f"'{member}' cannot be read: {err}.") from err
    except DAMAGED as err:
        raise UploadRefused(422, f"'{member}' is damaged in the archive ({err}); create the "
                                 "zip again.") from err
    return b"".join(parts)


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from an image header, without PIL's decompression-bomb guard
    (which refuses before telling the size)."""
    Image.init()
    for fmt in ("PNG", "JPEG", "BMP", "TIFF"):
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or (accept is not None and not accept(data[:16])):
            continue
        try:
            with factory(io.BytesIO(data)) as img:
                return img.size
        except Exception:  # not this format
            continue
    return None


def check_file(name: str, data: bytes, limits: Limits) -> Upload:
    """An upload with the suffix its bytes call for, or with the reason it is not used."""
    if not data:
        return Upload(name, b"", error="the file is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format, img.size
        except Image.DecompressionBombError as err:
            size = _header_size(data)
            if size is None:
                found = re.search(r"\((\d+) pixels\)", str(err))
                count = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
                raise UploadRefused(413, f"'{name}' has {count}, beyond the limit of "
                                         f"{limits.max_pixels:,}; send single-cell images.") \
                    from err
            fmt, (width, height) = None, size
        except Exception:  # PIL raises many types; the cell keeps the reason
            suffix = PurePath(name).suffix.lower()
            if suffix in IMAGE_SUFFIXES:  # named as an image: decoding will say what is wrong
                return Upload(name, data, ".jpg" if suffix == ".jpeg" else suffix)
            return Upload(name, b"", error="not an image file (JPEG, PNG, BMP or TIFF expected)")
    if width * height > limits.max_pixels:
        raise UploadRefused(413, f"'{name}' has {width}x{height} = {width * height:,} pixels, "
                                 f"beyond the limit of {limits.max_pixels:,}; send single-cell "
                                 "images or raise --max-pixels.")
    if fmt not in SUFFIX_OF:
        return Upload(name, b"", error=f"format {fmt} is not read; convert it to PNG or JPEG")
    return Upload(name, data, SUFFIX_OF[fmt])
