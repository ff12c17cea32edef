"""Finding images: labelled data sets (:func:`discover`) and unlabelled inputs
(:func:`collect_inputs`), with one set of patient rules for both.

Two layouts are read:

- a folder ``DATA/<label>/**/<image>``: the first folder level names a taxonomy node;
- a CSV manifest with columns ``path,label`` and optional ``patient``, ``slide``;
  relative paths resolve against the manifest's folder.

Unlabelled inputs (``leukotree predict``, ``report``) are image files, folders (searched
recursively) and manifests with a ``path`` column.

Patient ids (the groups that cross-validation must never split) come from, in
the order ``auto`` tries them: the manifest's ``patient`` column, the C-NMC file
names (``UID_<subject>_<image>_<cell>_<all|hem>.bmp``), or a sub-folder level
(``DATA/<label>/<patient>/<image>``). They may also be given explicitly with
``folder``, ``cnmc``, ``manifest``, ``none`` or ``re:<regex>`` (a regex with a
``(?P<patient>...)`` group, matched against the file name).

``folder`` means one thing everywhere: the first folder level below the folder that
was searched — the label folder of a data set (``DATA/<label>/<patient>/...``), or a
folder given to ``predict`` (``NEW/<patient>/...``). Images lying directly in a given
folder take that folder's name; those directly in a label folder have no patient id.
For a single file or a manifest row, it is the file's parent folder.

Discovery never raises on the first bad row: it collects every :class:`Problem`
so that ``leukotree data check`` can report them all; :meth:`SampleSet.raise_for_problems`
turns fatal ones into one clear error for commands that need clean data.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from leukotree.data.images import is_image_file
from leukotree.errors import DataError, UnknownLabelError, display_path
from leukotree.rundir import read_text
from leukotree.taxonomy import Taxonomy

#: C-NMC 2019 file names; the subject (``H`` marks healthy donors) is the patient.
CNMC_PATTERN = re.compile(
    r"^UID_(?P<patient>H?\d+)_(?P<image>\d+)_(?P<cell>\d+)_(?P<label>all|hem)\.bmp$",
    re.IGNORECASE,
)

#: PBC file-name prefixes and the node of taxonomy ``pbc-fine`` each one names.
PBC_PREFIXES = {
    "SNE": "segmented_neutrophil",
    "BNE": "band_neutrophil",
    "NEUTROPHIL": "neutrophil",
    "PMY": "promyelocyte",
    "MY": "myelocyte",
    "MMY": "metamyelocyte",
    "IG": "ig",
    "EO": "eosinophil",
    "BA": "basophil",
    "LY": "lymphocyte",
    "MO": "monocyte",
    "ERB": "erythroblast",
    "PLATELET": "platelet",
}

MANIFEST_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("patient", "slide")


@dataclass(frozen=True)
class Sample:
    """One labelled image."""

    path: Path
    label: str
    patient: str | None = None
    slide: str | None = None
    source: str = ""
    cell_label: str | None = None  # a node of a second, per-cell taxonomy (cell type)
    pixel_size: float | None = None  # micrometres per pixel (a manifest's pixel_size column)
    audit: bool = False  # a lab's audit cell (a manifest's audit column): never trained on

    @property
    def group(self) -> str:
        """The unit a split must keep together: the patient, else the slide, else the image."""
        if self.patient is not None:
            return f"patient:{self.patient}"
        if self.slide is not None:
            return f"slide:{self.slide}"
        return f"image:{self.path}"


@dataclass(frozen=True)
class Problem:
    """Something wrong with the data, found during discovery or checking."""

    kind: str
    where: str
    message: str
    fatal: bool = True

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "where": self.where, "message": self.message,
                "fatal": self.fatal}


@dataclass
class SampleSet:
    """The labelled images of one data source, with what was found wrong on the way."""

    samples: list[Sample]
    taxonomy: Taxonomy
    source: Path
    patient_source: str
    problems: list[Problem] = field(default_factory=list)
    ignored_files: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.samples]

    @property
    def groups(self) -> np.ndarray:
        return np.array([s.group for s in self.samples])

    @property
    def has_patients(self) -> bool:
        """True when at least one image has a patient or slide id."""
        return any(s.patient is not None or s.slide is not None for s in self.samples)

    @property
    def fatal_problems(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    def grouping_note(self) -> str | None:
        """A loud warning when images cannot be grouped by patient, else ``None``."""
        if not self.has_patients:
            return (
                "WARNING: no patient or slide ids were found, so every image is its own "
                "group. Cells of one patient may land on both sides of a split and "
                "inflate every metric. Give ids with a manifest 'patient' column, "
                "patient sub-folders (--patients folder) or a file-name regex "
                "(--patients 're:(?P<patient>...)')."
            )
        missing = sum(1 for s in self.samples if s.patient is None and s.slide is None)
        if missing:
            return (
                f"WARNING: {missing} of {len(self.samples)} images have no patient or slide "
                "id; each of them is its own group."
            )
        return None

    def raise_for_problems(self) -> None:
        """Raise one :class:`DataError` listing every fatal problem."""
        fatal = self.fatal_problems
        if not fatal:
            if not self.samples:
                raise DataError(f"No labelled images found in '{self.source}'.")
            return
        shown = "\n".join(f"  - {p.where}: {p.message}" for p in fatal)
        raise DataError(
            f"{len(fatal)} problem(s) in '{self.source}' must be fixed first:\n{shown}\n"
            f"Run 'leukotree data check {self.source} --taxonomy {self.taxonomy.name}' "
            "for the full report."
        )

    def not_used(self) -> list[tuple[str, str]]:
        """``(file, reason)`` for every file of the source that training will not use:
        files passed over (hidden, not images) and the non-fatal problems naming a file."""
        out = [(display_path(p), "hidden file or folder" if is_image_file(p) else
                f"not an image ({p.suffix or 'no suffix'}; JPEG, PNG, BMP or TIFF are read)")
               for p in self.ignored_files]
        return out + [(p.where, p.message) for p in self.problems
                      if not p.fatal and p.kind != "no_patient"]

    def subset(self, keep: list[int] | np.ndarray) -> SampleSet:
        return SampleSet(
            [self.samples[i] for i in keep], self.taxonomy, self.source,
            self.patient_source, list(self.problems), list(self.ignored_files),
        )


PatientRule = Callable[[Path, "Path | None"], "str | None"]
LabelRule = Callable[[Path, str], str]


def compile_rule(spec: str, group: str) -> re.Pattern[str]:
    """Compile a user regex that must capture ``(?P<group>...)`` or exactly one group."""
    try:
        pattern = re.compile(spec)
    except re.error as err:
        raise DataError(f"Invalid regular expression {spec!r}: {err}.") from None
    if group not in pattern.groupindex and pattern.groups != 1:
        raise DataError(
            f"The regular expression {spec!r} must have a named group (?P<{group}>...) "
            f"or exactly one group; it has {pattern.groups}."
        )
    return pattern


def match_group(pattern: re.Pattern[str], name: str, group: str) -> str | None:
    """The named (or only) group of the first match in ``name``, or ``None``."""
    m = pattern.search(name)
    if not m:
        return None
    return m.group(group) if group in pattern.groupindex else m.group(1)


def patient_rule(spec: str) -> PatientRule | None:
    """Turn a ``--patients`` value into a function ``(image, searched_folder) -> id``.

    ``searched_folder`` is the folder whose first level names patients (``None`` for a
    single file or a manifest row: the file's parent folder is used). Returns ``None``
    for ``none``, ``manifest`` and ``auto`` (handled by discovery).
    """
    if spec in {"none", "manifest", "auto"}:
        return None
    if spec == "cnmc":
        return lambda path, _root: match_group(CNMC_PATTERN, path.name, "patient")
    if spec == "folder":

        def by_folder(path: Path, searched: Path | None) -> str | None:
            if searched is None:
                return path.parent.name
            rel = path.relative_to(searched).parts
            return rel[0] if len(rel) >= 2 else None

        return by_folder
    if spec.startswith("re:"):
        pattern = compile_rule(spec[3:], "patient")
        return lambda path, _root: match_group(pattern, path.name, "patient")
    raise DataError(
        f"Invalid --patients value {spec!r}: use auto, none, manifest, folder, cnmc or "
        "re:<regex with (?P<patient>...)>."
    )


def label_column(spec: str) -> str | None:
    """The manifest column named by ``--labels column:<name>``, else ``None``."""
    if spec.startswith("column:"):
        name = spec[len("column:"):].strip()
        if not name:
            raise DataError("--labels column: needs a column name, e.g. column:cell_type.")
        return name
    return None


def label_rule(spec: str) -> LabelRule | None:
    """Turn a ``--labels`` value into ``(image, folder_label) -> label`` (``None``: the
    folder name, the manifest's ``label`` column, or the column of ``column:<name>``)."""
    if spec == "folder" or label_column(spec) is not None:
        return None
    if spec == "pbc-prefix":

        def by_prefix(path: Path, folder_label: str) -> str:
            prefix = path.name.split("_", 1)[0].upper()
            return PBC_PREFIXES.get(prefix, prefix)

        return by_prefix
    if spec.startswith("re:"):
        pattern = compile_rule(spec[3:], "label")

        def by_regex(path: Path, folder_label: str) -> str:
            found = match_group(pattern, path.name, "label")
            return found if found is not None else f"<no match of {spec[3:]!r}>"

        return by_regex
    raise DataError(
        f"Invalid --labels value {spec!r}: use folder, pbc-prefix, column:<manifest column> "
        "or re:<regex with (?P<label>...)>."
    )


def discover(
    data: str | Path,
    taxonomy: Taxonomy,
    *,
    patients: str = "auto",
    labels: str = "folder",
    cell_labels: str | None = None,
    cell_taxonomy: Taxonomy | None = None,
) -> SampleSet:
    """Find every labelled image of a folder layout or CSV manifest.

    Unknown labels, missing files, files that are not images and images without a
    label folder are recorded as :class:`Problem` s, never silently dropped. With
    ``cell_labels`` (``column:<name>`` of a manifest, or ``re:<regex>`` on the file
    name) each image also gets a cell label, a node of ``cell_taxonomy``; an empty cell
    leaves the image without one.
    """
    data = Path(data)
    if not data.exists():
        raise DataError(f"Data path '{display_path(data)}' does not exist.")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise DataError(
                f"Data path '{data}' is a file but not a CSV manifest; give a folder laid out "
                "as DATA/<label>/<image> or a .csv with columns path,label."
            )
        found = _from_manifest(data, taxonomy, patients, labels)
    else:
        found = _from_folder(data, taxonomy, patients, labels)
    if cell_labels is None:
        return found
    if cell_taxonomy is None:
        raise DataError("Cell labels need a cell taxonomy (--cell-taxonomy).")
    return _with_cell_labels(found, data, cell_labels, cell_taxonomy)


def _with_cell_labels(found: SampleSet, data: Path, spec: str, cells: Taxonomy) -> SampleSet:
    """``found`` with each sample's cell label read by rule ``spec`` and resolved."""
    column = label_column(spec)
    if column is not None:
        if not data.is_file():
            raise DataError(f"--cell-labels {spec} reads a manifest column, but '{data}' is a "
                            "folder; give a CSV manifest or use re:<regex> on file names.")
        reader, _ = _manifest_reader(data, "none", required=("path", column))
        by_path = {}
        for row in reader:
            raw = (row.get("path") or "").strip()
            if raw:
                path = Path(raw) if Path(raw).is_absolute() else data.parent / raw
                by_path[path] = (row.get(column) or "").strip()

        def raw_label(sample: Sample) -> str:
            return by_path.get(sample.path, "")
    elif spec.startswith("re:"):
        pattern = compile_rule(spec[3:], "label")

        def raw_label(sample: Sample) -> str:
            return match_group(pattern, sample.path.name, "label") or ""
    else:
        raise DataError(f"Invalid --cell-labels value {spec!r}: use column:<manifest column> "
                        "or re:<regex with (?P<label>...)> on the file name.")
    samples = []
    for sample in found.samples:
        raw = raw_label(sample)
        try:
            cell = cells.resolve(raw, where=f"cell label of {sample.source}") if raw else None
        except UnknownLabelError as err:
            found.problems.append(Problem("unknown_cell_label", sample.source, str(err)))
            continue
        samples.append(replace(sample, cell_label=cell))
    found.samples = samples
    return found


@dataclass
class Found:
    """What a folder holds: the images, the files passed over (hidden or not images), and
    the folders that could not be listed (with the reason)."""

    images: list[Path] = field(default_factory=list)
    passed: list[Path] = field(default_factory=list)
    unlisted: list[tuple[Path, str]] = field(default_factory=list)


def find_images(folder: Path) -> Found:
    """Image files under ``folder`` (recursively, sorted; symbolic links to folders are
    followed once each), and everything else it met, so nothing is dropped unnamed.

    Hidden files and folders (a name starting with ``.``, below ``folder``) and files
    that are not images by their suffix are *passed over*; a folder that cannot be
    listed (no permission) is *unlisted*.
    """
    found = Found()
    seen: set[str] = set()

    def unlisted(err: OSError) -> None:
        found.unlisted.append((Path(err.filename or folder), err.strerror or str(err)))

    for here, dirs, files in os.walk(folder, onerror=unlisted, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link back into the tree: already walked
            dirs[:] = []
            continue
        seen.add(real)
        base = Path(here)
        hidden_here = any(part.startswith(".") for part in base.relative_to(folder).parts)
        dirs.sort()
        for name in sorted(files):
            path = base / name
            if not hidden_here and not name.startswith(".") and is_image_file(path):
                found.images.append(path)
            else:
                found.passed.append(path)
    found.images.sort()
    found.passed.sort()
    return found


def utf8_problem(path: Path) -> Problem | None:
    """A fatal problem for a file name that is not valid UTF-8, else ``None``."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return Problem("bad_file_name", display_path(path),
                       "the file name is not valid UTF-8; rename the file")
    return None


def _from_folder(root: Path, taxonomy: Taxonomy, patients: str, labels: str) -> SampleSet:
    if label_column(labels) is not None:
        raise DataError(f"--labels {labels} reads a manifest column, but '{root}' is a folder; "
                        "give a CSV manifest with that column.")
    problems: list[Problem] = []
    ignored: list[Path] = []
    relabel = label_rule(labels)
    entries = _label_folder_entries(root, taxonomy, relabel is None, problems, ignored)
    if patients == "auto":
        patients = _auto_patients([e[0] for e in entries], [e[1] for e in entries])
    rule = patient_rule(patients)
    if patients == "manifest":
        raise DataError(
            f"--patients manifest needs a CSV manifest, but '{root}' is a folder; use "
            "folder, cnmc, re:<regex> or none."
        )
    samples: list[Sample] = []
    unknown_by_label: dict[str, list[Path]] = defaultdict(list)
    for img, label_dir, folder_label in entries:
        if folder_label is None:
            continue  # reported once per folder
        label = folder_label
        if relabel is not None:
            raw = relabel(img, label_dir.name)
            if raw not in taxonomy or raw == taxonomy.root:
                unknown_by_label[raw].append(img)
                continue
            label = taxonomy.resolve(raw)
        patient = rule(img, label_dir) if rule else None
        if rule is not None and patient is None:
            problems.append(Problem(
                "no_patient", str(img),
                f"no patient id found by rule '{patients}'; the image is its own group",
                fatal=False,
            ))
        samples.append(Sample(img, label, patient, None, source=str(img.relative_to(root))))
    for raw, paths in unknown_by_label.items():
        problems.append(Problem(
            "unknown_label", str(paths[0]),
            f"{len(paths)} image(s) get label '{raw}' from rule '{labels}', which is not a node "
            f"of taxonomy '{taxonomy.name}'." + _hint(raw, taxonomy),
        ))
    if not entries and not problems:
        problems.append(Problem(
            "no_images", str(root),
            "no images found; expected DATA/<label>/<image> with JPEG, PNG, BMP or TIFF files",
        ))
    return SampleSet(samples, taxonomy, root, patients, problems, ignored)


def _label_folder_entries(root: Path, taxonomy: Taxonomy, folder_labels: bool,
                          problems: list[Problem], ignored: list[Path],
                          ) -> list[tuple[Path, Path, str | None]]:
    """``(image, label folder, its label)`` for every image below a label folder; the label
    is ``None`` for a folder that names no node (reported once in ``problems``)."""
    entries: list[tuple[Path, Path, str | None]] = []
    for top in sorted(root.iterdir()):
        if top.name.startswith("."):
            ignored.append(top)
            continue
        if top.is_file():
            if is_image_file(top):
                problems.append(Problem(
                    "unlabelled_image", str(top),
                    "image directly in the data folder, outside any label folder; move it "
                    "into DATA/<label>/", fatal=False,
                ))
            else:
                ignored.append(top)
            continue
        folder_label: str | None = top.name
        if folder_labels:
            try:
                folder_label = taxonomy.resolve(top.name, where=f"folder name '{top}'")
            except UnknownLabelError as err:
                problems.append(Problem("unknown_label", str(top), str(err)))
                folder_label = None
        found = find_images(top)
        ignored.extend(found.passed)
        problems.extend(Problem("unlisted_folder", display_path(d), f"cannot list the folder "
                                f"({reason}); its images would be missed")
                        for d, reason in found.unlisted)
        problems.extend(p for p in map(utf8_problem, found.images) if p is not None)
        images = [i for i in found.images if utf8_problem(i) is None]
        if not images:
            problems.append(Problem(
                "empty_label_folder", str(top), "label folder holds no images", fatal=False,
            ))
        entries.extend((img, top, folder_label) for img in images)
    return entries


def _hint(label: str, taxonomy: Taxonomy) -> str:
    try:
        taxonomy.resolve(label)
    except UnknownLabelError as err:
        text = str(err)
        return text[text.index(" Did you mean"):] if " Did you mean" in text else ""
    return ""


def _auto_patients(images: list[Path], label_dirs: list[Path]) -> str:
    if not images:
        return "none"
    if all(CNMC_PATTERN.match(p.name) for p in images):
        return "cnmc"
    if all(len(p.relative_to(d).parts) == 2 for p, d in zip(images, label_dirs, strict=True)):
        return "folder"
    return "none"


def _manifest_reader(manifest: Path, patients: str,
                     required: Sequence[str] = MANIFEST_COLUMNS) -> tuple[csv.DictReader, str]:
    """A reader over the manifest's rows (header stripped and checked) and the patient rule
    to use."""
    reader = csv.DictReader(io.StringIO(read_text(manifest, "Manifest"), newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"Manifest '{manifest}' lacks the column(s) {missing}; found columns {header}. "
            f"The first line must name at least '{','.join(required)}' (optional: patient, "
            "slide)."
        )
    reader.fieldnames = header
    has_patient = "patient" in header
    if patients == "auto":
        patients = "manifest" if has_patient else "none"
    if patients == "manifest" and not has_patient:
        raise DataError(
            f"--patients manifest, but manifest '{manifest}' has no 'patient' column "
            f"(columns: {header})."
        )
    if patients == "folder":
        raise DataError(
            "--patients folder applies to folder layouts; with a manifest, add a "
            "'patient' column or use re:<regex>."
        )
    return reader, patients


def _from_manifest(manifest: Path, taxonomy: Taxonomy, patients: str, labels: str) -> SampleSet:
    column = label_column(labels) or "label"
    required = ("path", column) if column != "label" else MANIFEST_COLUMNS
    reader, patients = _manifest_reader(manifest, patients, required=required)
    rule = patient_rule(patients)
    relabel = label_rule(labels)
    problems: list[Problem] = []
    samples: list[Sample] = []
    first_line: dict[Path, int] = {}
    for row in reader:
        where = f"{manifest.name} line {reader.line_num}"
        raw_path = (row.get("path") or "").strip()
        if not raw_path:
            problems.append(Problem("empty_path", where, "the 'path' cell is empty"))
            continue
        path = Path(raw_path)
        path = path if path.is_absolute() else manifest.parent / path
        if path in first_line:
            problems.append(Problem(
                "duplicate_path", where,
                f"'{raw_path}' is listed again (first on line {first_line[path]}); list "
                "each image once",
            ))
            continue
        first_line[path] = reader.line_num
        raw_label = (row.get(column) or "").strip()
        if relabel is not None:
            raw_label = relabel(path, raw_label)
        sample = _manifest_sample(row, path, raw_label, where, taxonomy, patients, rule,
                                  problems)
        if sample is not None:
            samples.append(sample)
    if not samples and not problems:
        problems.append(Problem("no_images", str(manifest), "the manifest lists no images"))
    return SampleSet(samples, taxonomy, manifest, patients, problems, [])


def manifest_pixel_size(row: dict[str, str]) -> float | None:
    """The optional ``pixel_size`` cell of a manifest row (micrometres per pixel of that
    image, in (0, 1000]); empty or absent: None. A bad value raises ValueError with the
    rule, for the caller to place."""
    raw = (row.get("pixel_size") or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1000:
        raise ValueError(f"the 'pixel_size' cell must be micrometres per pixel in (0, 1000]; "
                         f"found {raw!r}. Fix it, or leave it empty for the default pixel "
                         "size.")
    return value


AUDIT_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False,
                "": False}


def manifest_audit(row: dict[str, str]) -> bool:
    """The optional ``audit`` cell of a manifest row (``True``/``False`` as ``leukotree
    select`` and ``serve``'s corrections write them; 1/0, yes/no; empty: False). A bad
    value raises ValueError with the rule, for the caller to place."""
    raw = (row.get("audit") or "").strip()
    if raw.lower() not in AUDIT_VALUES:
        raise ValueError(f"the 'audit' cell must be true or false (an audit cell is the "
                         f"lab's test set, never trained on); found {raw!r}.")
    return AUDIT_VALUES[raw.lower()]


def _manifest_sample(row: dict[str, str], path: Path, raw_label: str, where: str,
                     taxonomy: Taxonomy, patients: str, rule: PatientRule | None,
                     problems: list[Problem]) -> Sample | None:
    """The sample of one manifest row, or ``None`` with the reason added to ``problems``."""
    if not raw_label:
        problems.append(Problem("empty_label", where, "the label cell is empty"))
        return None
    try:
        label = taxonomy.resolve(raw_label, where=where)
    except UnknownLabelError as err:
        problems.append(Problem("unknown_label", where, str(err)))
        return None
    if not path.is_file():
        problems.append(Problem("missing_file", where, f"image '{path}' does not exist"))
        return None
    try:
        pixel_size = manifest_pixel_size(row)
    except ValueError as err:
        problems.append(Problem("bad_pixel_size", where, str(err)))
        return None
    try:
        audit = manifest_audit(row)
    except ValueError as err:
        problems.append(Problem("bad_audit", where, str(err)))
        return None
    patient: str | None = None
    if patients == "manifest":
        patient = (row.get("patient") or "").strip() or None
    elif rule is not None:
        patient = rule(path, None)
    slide = (row.get("slide") or "").strip() or None
    if patients != "none" and patient is None:
        unit = f"slide '{slide}'" if slide else "the image itself"
        problems.append(Problem(
            "no_patient", where,
            f"no patient id (rule '{patients}'); it is grouped by {unit}", fatal=False,
        ))
    return Sample(path, label, patient, slide, source=where, pixel_size=pixel_size,
                  audit=audit)


@dataclass(frozen=True)
class InputImage:
    """One image to predict, with its patient id and label when the layout gives them."""

    path: Path
    patient: str | None = None
    label: str | None = None
    pixel_size: float | None = None  # micrometres per pixel (a manifest's pixel_size column)
    audit: bool = False  # a lab's audit cell (a manifest's audit column): never trained on


_INPUT_PATIENTS = ("auto", "none", "folder", "cnmc", "manifest")


def label_folders(folder: Path, taxonomy: Taxonomy | None) -> list[Path] | None:
    """The label folders of ``folder`` when it is laid out as ``DATA/<label>/...`` (every
    visible sub-folder names a node of ``taxonomy``), else ``None``."""
    if taxonomy is None:
        return None
    subs = [d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if subs and all(d.name in taxonomy and d.name != taxonomy.root for d in subs):
        return subs
    return None


@dataclass
class InputSet:
    """The images to predict, and the files met on the way that are not used (hidden files
    and files that are not images), so that every input is either used or named."""

    images: list[InputImage] = field(default_factory=list)
    not_used: list[Path] = field(default_factory=list)


def collect_inputs(inputs: Sequence[str | Path], patients: str = "none",
                   taxonomy: Taxonomy | None = None) -> InputSet:
    """Images from files, folders (recursively) and CSV manifests (column ``path``).

    ``patients``: ``auto`` (a manifest's ``patient`` column; in a folder, C-NMC file names
    or else ``folder``; none for single files), ``none``, ``folder`` (see the module
    docstring), ``cnmc``, ``re:<regex>`` on the file name, or ``manifest`` (a manifest's
    ``patient`` column, also used for manifests under ``none``). Given the ``taxonomy``, a folder
    laid out as ``DATA/<label>/...`` is read as a data set: each image gets its label,
    and ``folder`` patients are the first level below the label folders, as in training.
    Files given one by one are always used (an unreadable one gets its error).
    """
    if patients not in _INPUT_PATIENTS and not patients.startswith("re:"):
        raise DataError(f"Invalid --patients value {patients!r}: use auto, none, folder, "
                        "cnmc, manifest or re:<regex>.")
    rule = patient_rule(patients)
    out = InputSet()
    for item in map(Path, inputs):
        if item.is_dir():
            out.images.extend(_inputs_from_folder(item, patients, rule, taxonomy,
                                                  out.not_used))
        elif item.suffix.lower() == ".csv":
            out.images.extend(_inputs_from_manifest(item, patients, rule))
        elif item.exists() or item.is_symlink():
            out.images.append(InputImage(item, rule(item, None) if rule else None))
        else:
            raise DataError(f"Input '{display_path(item)}' does not exist.")
    return out


def _inputs_from_folder(folder: Path, patients: str, rule: PatientRule | None,
                        taxonomy: Taxonomy | None, not_used: list[Path]) -> list[InputImage]:
    found = find_images(folder)
    if found.unlisted:
        d, reason = found.unlisted[0]
        raise DataError(f"Cannot list folder '{display_path(d)}' ({reason}); its images "
                        "would be missed. Fix its permissions or leave it out.")
    not_used.extend(found.passed)
    labelled = {d.name: d for d in label_folders(folder, taxonomy) or []}
    if patients == "auto":  # C-NMC file names, else the folder rule
        patients = "cnmc" if found.images and all(
            CNMC_PATTERN.match(p.name) for p in found.images) else "folder"
        rule = patient_rule(patients)
    out = []
    for path in found.images:
        top = path.relative_to(folder).parts[0]
        label_dir = labelled.get(top) if len(path.relative_to(folder).parts) > 1 else None
        root = label_dir or folder
        if patients == "folder" and path.parent == root and label_dir is None:
            patient = root.name  # a folder of one patient's cells
        else:
            patient = rule(path, root) if rule else None
        out.append(InputImage(path, patient, top if label_dir is not None else None))
    if not out:
        raise DataError(f"Folder '{display_path(folder)}' holds no images (JPEG, PNG, BMP, "
                        "TIFF)" + (f"; it holds {len(not_used)} other file(s)" if not_used
                                  else "") + ".")
    return out


def _inputs_from_manifest(manifest: Path, patients: str, rule: PatientRule | None,
                          ) -> list[InputImage]:
    reader, _ = _manifest_reader(manifest, "none", required=("path",))
    out = []
    for row in reader:
        raw = (row.get("path") or "").strip()
        if not raw:
            raise DataError(f"{manifest.name} line {reader.line_num}: the 'path' cell is "
                            "empty; give every row an image path.")
        p = Path(raw)
        p = p if p.is_absolute() else manifest.parent / p
        if patients in {"auto", "none", "manifest"}:
            pid = (row.get("patient") or "").strip() or None
        else:
            pid = rule(p, None) if rule else None
        try:
            pixel_size = manifest_pixel_size(row)
        except ValueError as err:
            raise DataError(f"{manifest.name} line {reader.line_num}: {err}") from None
        out.append(InputImage(p, pid, pixel_size=pixel_size))
    return out
