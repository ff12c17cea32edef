"""Finding labelled images: folder layouts, manifests, patient and label rules."""

from __future__ import annotations

import gzip
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from conftest import (
    FIXTURES,
    SYNTH_CELLS_PER_PATIENT,
    SYNTH_PATIENTS_PER_CLASS,
    write_image,
)
from leukotree.data.discover import (
    CNMC_PATTERN,
    PBC_PREFIXES,
    Sample,
    SampleSet,
    collect_inputs,
    discover,
    label_rule,
    patient_rule,
)
from leukotree.errors import DataError
from leukotree.taxonomy import load_taxonomy


def kinds(sample_set: SampleSet) -> Counter[str]:
    return Counter(p.kind for p in sample_set.problems)


# ------------------------------------------------------------------ synthetic folder
def test_discover_synthetic_folder(synth_dir, leukemia7):
    found = discover(synth_dir, leukemia7)
    assert found.patient_source == "folder"
    assert len(found) == 7 * SYNTH_PATIENTS_PER_CLASS * SYNTH_CELLS_PER_PATIENT
    assert found.problems == []
    assert found.ignored_files == []
    assert found.has_patients
    assert found.grouping_note() is None
    assert set(found.labels) == set(leukemia7.leaves)
    counts = Counter(s.label for s in found.samples)
    assert set(counts.values()) == {SYNTH_PATIENTS_PER_CLASS * SYNTH_CELLS_PER_PATIENT}
    for s in found.samples:
        assert s.patient is not None
        assert s.patient == s.path.parent.name
        assert s.patient.startswith(f"{s.label}-p")
        assert s.group == f"patient:{s.patient}"
        assert s.source == str(s.path.relative_to(synth_dir))
    groups = found.groups
    assert len(set(groups.tolist())) == 7 * SYNTH_PATIENTS_PER_CLASS
    assert all(g.startswith("patient:") for g in groups.tolist())
    found.raise_for_problems()  # clean data: no error


def test_discover_missing_path(tmp_path, leukemia7):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope", leukemia7)


def test_discover_file_that_is_not_csv(tmp_path, leukemia7):
    path = tmp_path / "list.txt"
    path.write_text("x")
    with pytest.raises(DataError, match="not a CSV manifest"):
        discover(path, leukemia7)


def test_discover_empty_folder(tmp_path, leukemia7):
    found = discover(tmp_path, leukemia7)
    assert kinds(found) == {"no_images": 1}
    with pytest.raises(DataError):
        found.raise_for_problems()


# ------------------------------------------------------------------ manifests
def _manifest_folder(tmp_path: Path) -> Path:
    for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3), ("d.png", 4)):
        write_image(tmp_path / "imgs" / name, "png", seed=seed)
    return tmp_path


def test_manifest_resolves_relative_paths(tmp_path, leukemia7):
    root = _manifest_folder(tmp_path)
    absolute = root / "imgs" / "d.png"
    manifest = root / "lists" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        "path,label,patient,slide\n"
        "../imgs/a.png,ALL,P1,S1\n"
        "../imgs/b.png,Acute,P1,\n"
        f"{absolute},CML,,S9\n"
    )
    found = discover(manifest, leukemia7)
    assert kinds(found) == {"no_patient": 1}  # line 4 has a slide but no patient
    assert found.problems[0].where == "manifest.csv line 4"
    assert not found.fatal_problems
    assert found.patient_source == "manifest"
    assert [s.label for s in found.samples] == ["ALL", "Acute", "CML"]
    assert found.samples[0].path == manifest.parent / "../imgs/a.png"
    assert found.samples[0].path.resolve() == (root / "imgs" / "a.png").resolve()
    assert found.samples[2].path == absolute
    assert [s.patient for s in found.samples] == ["P1", "P1", None]
    assert [s.slide for s in found.samples] == ["S1", None, "S9"]
    assert [s.group for s in found.samples] == ["patient:P1", "patient:P1", "slide:S9"]
    assert found.samples[1].source == "manifest.csv line 3"


def test_manifest_problems_name_the_line(tmp_path, leukemia7):
    root = _manifest_folder(tmp_path)
    manifest = root / "manifest.csv"
    manifest.write_text(
        "path,label,patient\n"
        "imgs/a.png,ALL,P1\n"  # line 2: fine
        "imgs/b.png,AMl,P1\n"  # line 3: unknown label
        "imgs/missing.png,ALL,P2\n"  # line 4: missing file
        "imgs/c.png,,P2\n"  # line 5: empty label
        "imgs/a.png,ALL,P1\n"  # line 6: duplicate of line 2
        ",ALL,P3\n"  # line 7: empty path
        "imgs/d.png,CML,P3\n"  # line 8: fine
    )
    found = discover(manifest, leukemia7)
    assert [s.path.name for s in found.samples] == ["a.png", "d.png"]
    by_where = {p.where: p for p in found.problems}
    assert set(by_where) == {f"manifest.csv line {n}" for n in (3, 4, 5, 6, 7)}
    unknown = by_where["manifest.csv line 3"]
    assert unknown.kind == "unknown_label" and unknown.fatal
    assert "Unknown label 'AMl'" in unknown.message
    assert "Did you mean 'AML'" in unknown.message
    missing = by_where["manifest.csv line 4"]
    assert missing.kind == "missing_file"
    assert "missing.png" in missing.message
    assert by_where["manifest.csv line 5"].kind == "empty_label"
    duplicate = by_where["manifest.csv line 6"]
    assert duplicate.kind == "duplicate_path"
    assert "first on line 2" in duplicate.message
    assert by_where["manifest.csv line 7"].kind == "empty_path"
    assert all(p.fatal for p in found.problems)

    with pytest.raises(DataError) as excinfo:
        found.raise_for_problems()
    text = str(excinfo.value)
    assert text.startswith("5 problem(s)")
    for n in (3, 4, 5, 6, 7):
        assert f"manifest.csv line {n}" in text
    assert "leukotree data check" in text


def test_manifest_missing_required_column(tmp_path, leukemia7):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label,patient\nx.png,ALL,P1\n")
    with pytest.raises(DataError) as excinfo:
        discover(manifest, leukemia7)
    text = str(excinfo.value)
    assert "['path']" in text
    assert "found columns ['file', 'label', 'patient']" in text


def test_manifest_header_with_spaces_and_bom(tmp_path, leukemia7):
    root = _manifest_folder(tmp_path)
    manifest = root / "m.csv"
    manifest.write_bytes("\ufeff path , label \nimgs/a.png, ALL \n".encode())
    found = discover(manifest, leukemia7)
    assert found.problems == []
    assert found.samples[0].label == "ALL"


def test_manifest_without_patient_column(tmp_path, leukemia7):
    root = _manifest_folder(tmp_path)
    manifest = root / "m.csv"
    manifest.write_text("path,label\nimgs/a.png,ALL\nimgs/b.png,CLL\n")
    found = discover(manifest, leukemia7)
    assert found.patient_source == "none"
    assert not found.has_patients
    assert found.grouping_note().startswith("WARNING")
    with pytest.raises(DataError, match="no 'patient' column"):
        discover(manifest, leukemia7, patients="manifest")
    with pytest.raises(DataError, match="folder layouts"):
        discover(manifest, leukemia7, patients="folder")


def test_manifest_partial_patient_ids_warn(tmp_path, leukemia7):
    root = _manifest_folder(tmp_path)
    manifest = root / "m.csv"
    manifest.write_text("path,label,patient\nimgs/a.png,ALL,P1\nimgs/b.png,ALL,\n")
    found = discover(manifest, leukemia7)
    assert kinds(found) == {"no_patient": 1}
    assert not found.fatal_problems
    note = found.grouping_note()
    assert note.startswith("WARNING: 1 of 2 images")


def test_manifest_patients_by_regex(tmp_path, leukemia7):
    write_image(tmp_path / "imgs" / "P07_cell1.png", "png")
    write_image(tmp_path / "imgs" / "P08_cell1.png", "png", seed=1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nimgs/P07_cell1.png,ALL\nimgs/P08_cell1.png,AML\n")
    found = discover(manifest, leukemia7, patients=r"re:^(?P<patient>P\d+)_")
    assert [s.patient for s in found.samples] == ["P07", "P08"]


# ------------------------------------------------------------------ folders
def test_folder_with_problems(tmp_path, leukemia7):
    write_image(tmp_path / "ALL" / "P1" / "a.png", "png")
    write_image(tmp_path / "ALL" / "P1" / "b.jpg", "jpeg")
    (tmp_path / "ALL" / "P1" / "notes.txt").write_text("x")
    (tmp_path / "ALL" / "P1" / "scan.gif").write_bytes(b"GIF89a")
    write_image(tmp_path / "Bogus" / "P2" / "c.png", "png")
    write_image(tmp_path / "stray.png", "png")
    (tmp_path / "README.md").write_text("readme")
    (tmp_path / "CML").mkdir()
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.png").write_bytes(b"")

    found = discover(tmp_path, leukemia7)
    assert [s.path.name for s in found.samples] == ["a.png", "b.jpg"]
    assert found.patient_source == "folder"
    assert kinds(found) == {"unknown_label": 1, "unlabelled_image": 1, "empty_label_folder": 1}
    by_kind = {p.kind: p for p in found.problems}

    unknown = by_kind["unknown_label"]
    assert unknown.fatal
    assert unknown.where == str(tmp_path / "Bogus")
    assert "Unknown label 'Bogus'" in unknown.message

    stray = by_kind["unlabelled_image"]
    assert not stray.fatal
    assert stray.where == str(tmp_path / "stray.png")
    assert not by_kind["empty_label_folder"].fatal

    ignored = {p.name for p in found.ignored_files}
    assert {"notes.txt", "scan.gif", "README.md", ".cache"} <= ignored

    with pytest.raises(DataError) as excinfo:
        found.raise_for_problems()
    assert "1 problem(s)" in str(excinfo.value)
    assert "Bogus" in str(excinfo.value)


def test_unknown_label_folder_suggests_the_right_name(tmp_path, leukemia7):
    write_image(tmp_path / "all" / "P1" / "a.png", "png")
    found = discover(tmp_path, leukemia7)
    assert found.samples == []
    assert "Did you mean 'ALL'" in found.problems[0].message


def test_no_patient_ids_gives_a_loud_warning(tmp_path, leukemia7):
    write_image(tmp_path / "ALL" / "a.png", "png")
    write_image(tmp_path / "CLL" / "b.png", "png", seed=1)
    found = discover(tmp_path, leukemia7)
    assert found.patient_source == "none"
    assert not found.has_patients
    assert all(s.patient is None for s in found.samples)
    assert [s.group for s in found.samples] == [f"image:{s.path}" for s in found.samples]
    note = found.grouping_note()
    assert note.startswith("WARNING")
    assert "no patient or slide ids" in note
    assert "--patients" in note


def test_mixed_depths_fall_back_to_no_patients(tmp_path, leukemia7):
    write_image(tmp_path / "ALL" / "P1" / "a.png", "png")
    write_image(tmp_path / "ALL" / "b.png", "png", seed=1)
    assert discover(tmp_path, leukemia7).patient_source == "none"
    explicit = discover(tmp_path, leukemia7, patients="folder")
    assert {s.path.name: s.patient for s in explicit.samples} == {"a.png": "P1", "b.png": None}
    assert kinds(explicit) == {"no_patient": 1}
    assert not explicit.fatal_problems


def test_patients_manifest_on_a_folder_is_refused(tmp_path, leukemia7):
    write_image(tmp_path / "ALL" / "P1" / "a.png", "png")
    with pytest.raises(DataError, match="needs a CSV manifest"):
        discover(tmp_path, leukemia7, patients="manifest")


def test_patients_regex_rule_with_named_group(tmp_path, leukemia7):
    write_image(tmp_path / "ALL" / "pt-12_slide3_cell1.png", "png")
    write_image(tmp_path / "ALL" / "pt-12_slide3_cell2.png", "png", seed=1)
    write_image(tmp_path / "AML" / "pt-7_slide1_cell1.png", "png", seed=2)
    write_image(tmp_path / "AML" / "unnamed.png", "png", seed=3)
    found = discover(tmp_path, leukemia7, patients=r"re:pt-(?P<patient>\d+)_slide")
    assert found.patient_source == r"re:pt-(?P<patient>\d+)_slide"
    by_name = {s.path.name: s.patient for s in found.samples}
    assert by_name == {
        "pt-12_slide3_cell1.png": "12",
        "pt-12_slide3_cell2.png": "12",
        "pt-7_slide1_cell1.png": "7",
        "unnamed.png": None,
    }
    assert kinds(found) == {"no_patient": 1}
    assert not found.fatal_problems


def test_patients_regex_with_one_unnamed_group():
    rule = patient_rule(r"re:^(\w+?)_")
    assert rule(Path("/d/ALL/abc_1.png"), Path("/d/ALL")) == "abc"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("re:(", "Invalid regular expression"),
        (r"re:(\d+)_(\d+)", "exactly one group"),
        ("re:abc", "exactly one group"),
        ("by-patient", "Invalid --patients value"),
    ],
)
def test_bad_patient_rules(spec, expected):
    with pytest.raises(DataError, match=expected):
        patient_rule(spec)


def test_bad_patient_rule_through_discover(tmp_path, leukemia7):
    write_image(tmp_path / "ALL" / "a.png", "png")
    with pytest.raises(DataError, match="Invalid regular expression"):
        discover(tmp_path, leukemia7, patients="re:(?P<patient>[")


def test_bad_label_rule():
    with pytest.raises(DataError, match="Invalid --labels value"):
        label_rule("prefix")
    with pytest.raises(DataError, match="Invalid regular expression"):
        label_rule("re:[")


# ------------------------------------------------------------------ label rules
def test_pbc_prefix_labels_with_pbc_fine(tmp_path):
    tax = load_taxonomy("pbc-fine")
    files = {
        "neutrophil/SNE_1.jpg": "segmented_neutrophil",
        "neutrophil/BNE_2.jpg": "band_neutrophil",
        "neutrophil/NEUTROPHIL_3.jpg": "neutrophil",  # inner node
        "ig/IG_2.jpg": "ig",  # inner node
        "ig/PMY_4.jpg": "promyelocyte",
        "ig/MY_5.jpg": "myelocyte",
        "ig/MMY_6.jpg": "metamyelocyte",
        "eosinophil/EO_7.jpg": "eosinophil",
        "basophil/BA_8.jpg": "basophil",
        "lymphocyte/LY_9.jpg": "lymphocyte",
        "monocyte/MO_10.jpg": "monocyte",
        "erythroblast/ERB_11.jpg": "erythroblast",
        "platelet/PLATELET_12.jpg": "platelet",
    }
    for i, rel in enumerate(files):
        write_image(tmp_path / rel, "jpeg", seed=i)
    write_image(tmp_path / "ig" / "XYZ_13.jpg", "jpeg", seed=99)
    found = discover(tmp_path, tax, labels="pbc-prefix")
    got = {str(s.path.relative_to(tmp_path)): s.label for s in found.samples}
    assert got == files
    assert not tax.is_leaf(got["ig/IG_2.jpg"])
    assert found.patient_source == "none"
    # the unknown prefix is reported, with its image, not silently dropped
    assert kinds(found) == {"unknown_label": 1}
    problem = found.problems[0]
    assert problem.fatal
    assert "XYZ_13.jpg" in problem.where
    assert "'XYZ'" in problem.message


def test_pbc_prefix_table_covers_pbc_fine():
    tax = load_taxonomy("pbc-fine")
    assert set(PBC_PREFIXES.values()) <= set(tax.nodes)
    assert set(tax.leaves) <= set(PBC_PREFIXES.values())


def test_regex_label_rule_in_a_folder(tmp_path, leukemia7):
    write_image(tmp_path / "any" / "P1" / "x_ALL_1.png", "png")
    write_image(tmp_path / "any" / "P1" / "x_AML_2.png", "png", seed=1)
    write_image(tmp_path / "any" / "P1" / "x_AMLX_3.png", "png", seed=2)
    found = discover(tmp_path, leukemia7, labels=r"re:_(?P<label>[A-Z]+)_")
    assert sorted(s.label for s in found.samples) == ["ALL", "AML"]
    assert kinds(found) == {"unknown_label": 1}
    assert "Did you mean 'AML'" in found.problems[0].message


# ------------------------------------------------------------------ C-NMC
def _cnmc_names() -> list[str]:
    with gzip.open(FIXTURES / "cnmc-training-filenames.txt.gz", "rt", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def test_cnmc_pattern_parses_every_training_file_name():
    paths = _cnmc_names()
    assert len(paths) == 10_661
    subjects: dict[str, set[str]] = defaultdict(set)
    counts: Counter[str] = Counter()
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        m = CNMC_PATTERN.match(name)
        assert m is not None, name
        kind = m.group("label").lower()
        assert path.split("/")[-2] == kind  # the folder agrees with the suffix
        subjects[m.group("patient")].add(kind)
        counts[kind] += 1
    assert counts == {"all": 7272, "hem": 3389}
    # one subject, one kind: an H prefix (either case) means healthy, else ALL
    for subject, seen in subjects.items():
        healthy = subject[0] in "Hh"
        assert seen == ({"hem"} if healthy else {"all"}), subject
    all_subjects = {s for s, k in subjects.items() if k == {"all"}}
    hem_subjects = {s for s, k in subjects.items() if k == {"hem"}}
    # 47 ALL and 26 healthy subjects, as published for the C-NMC 2019 training set.
    # One healthy subject is spelled 'h3' with a lower-case h: a case-sensitive
    # 'H' test would count it as an ALL subject (48 / 25).
    assert len(all_subjects) == 47
    assert len(hem_subjects) == 26
    assert "h3" in hem_subjects
    assert all(s.isdigit() for s in all_subjects)
    assert {"1", "67", "68", "H6"} <= all_subjects | hem_subjects


def test_cnmc_pattern_rejects_other_names():
    for name in ("UID_1_3_1_all.png", "UID_X1_3_1_all.bmp", "UID_1_3_all.bmp",
                 "UID_1_3_1_aml.bmp", "xUID_1_3_1_all.bmp"):
        assert CNMC_PATTERN.match(name) is None, name
    m = CNMC_PATTERN.match("UID_H10_2_7_hem.bmp")
    assert m.group("patient", "image", "cell", "label") == ("H10", "2", "7", "hem")


def test_discover_real_cnmc_fixture_folder():
    tax = load_taxonomy("cnmc")
    found = discover(FIXTURES / "cnmc", tax)
    assert found.patient_source == "cnmc"
    assert found.problems == []
    assert len(found) == 8
    assert {s.patient for s in found.samples} == {"1", "67", "68", "H6"}
    by_patient = defaultdict(set)
    for s in found.samples:
        by_patient[s.patient].add(s.label)
    assert by_patient == {"1": {"all"}, "67": {"all"}, "68": {"all"}, "H6": {"hem"}}
    assert Counter(found.labels) == {"all": 5, "hem": 3}
    assert found.grouping_note() is None


# ------------------------------------------------------------------ small API
def test_sample_group_precedence(tmp_path):
    p = tmp_path / "x.png"
    assert Sample(p, "ALL", "P1", "S1").group == "patient:P1"
    assert Sample(p, "ALL", None, "S1").group == "slide:S1"
    assert Sample(p, "ALL").group == f"image:{p}"


def test_subset_keeps_problems(tmp_path, leukemia7):
    write_image(tmp_path / "ALL" / "P1" / "a.png", "png")
    write_image(tmp_path / "ALL" / "P1" / "b.png", "png", seed=1)
    write_image(tmp_path / "stray.png", "png")
    found = discover(tmp_path, leukemia7)
    sub = found.subset([1])
    assert [s.path.name for s in sub.samples] == ["b.png"]
    assert sub.problems == found.problems and sub.problems is not found.problems
    assert sub.patient_source == found.patient_source


def test_collect_inputs_from_files_folders_and_manifests(tmp_path):
    (tmp_path / "P1").mkdir()
    (tmp_path / "P1" / "a.png").write_bytes(b"x")
    (tmp_path / "P1" / "notes.txt").write_text("ignored: not an image")
    (tmp_path / "m.csv").write_text("path,patient\nP1/a.png,77\n")
    got = collect_inputs([tmp_path / "P1", tmp_path / "m.csv"], patients="folder")
    assert [(i.path.name, i.patient) for i in got.images] == [("a.png", "P1"), ("a.png", "P1")]
    assert [p.name for p in got.not_used] == ["notes.txt"]  # named, not silently dropped
    got = collect_inputs([tmp_path / "m.csv"])
    assert got.images[0].patient == "77"
    with pytest.raises(DataError, match="does not exist"):
        collect_inputs([tmp_path / "missing.png"])


def test_labels_and_cell_labels_from_manifest_columns_and_aliases(tmp_path, make_image):
    from leukotree.taxonomy import load_taxonomy

    for name in ("a.png", "b.png", "c.png"):
        make_image(tmp_path / name)
    (tmp_path / "m.csv").write_text(
        "path,label,patient,cell_type\n"
        "a.png,APL,p1,promyelocyte\nb.png,APML,p1,smudge-cells\nc.png,AML,p2,\n")
    found = discover(tmp_path / "m.csv", load_taxonomy("aml-apl"), cell_labels="column:cell_type",
                     cell_taxonomy=load_taxonomy("jhh-cells"))
    assert [(s.label, s.cell_label) for s in found.samples] == [
        ("APL", "promyelocyte"), ("APL", "smudge-cell"), ("AML", None)]
    by_type = discover(tmp_path / "m.csv", load_taxonomy("jhh-cells"),
                       labels="column:cell_type")
    assert [p.kind for p in by_type.problems] == ["empty_label"]
    (tmp_path / "bad.csv").write_text("path,label,cell_type\na.png,AML,myeloblastt\n")
    bad = discover(tmp_path / "bad.csv", load_taxonomy("aml-apl"), cell_labels="column:cell_type",
                   cell_taxonomy=load_taxonomy("jhh-cells"))
    assert [p.kind for p in bad.problems] == ["unknown_cell_label"] and not bad.samples
    with pytest.raises(DataError, match="reads a manifest column"):
        discover(tmp_path, load_taxonomy("aml-apl"), labels="column:cell_type")


def test_a_manifest_audit_column_is_read_and_checked(tmp_path, leukemia7):
    from PIL import Image

    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,audit\na.png,AML,True\nb.png,AML,false\nc.png,AML,\n"
                        "d.png,AML,maybe\n")
    found = discover(manifest, leukemia7)
    assert [s.audit for s in found.samples] == [True, False, False]
    [problem] = [p for p in found.problems if p.kind == "bad_audit"]
    assert problem.where == "m.csv line 5" and "must be true or false" in problem.message
    assert "found 'maybe'" in problem.message


def test_a_manifest_pixel_size_column_is_read_and_checked(tmp_path, leukemia7):
    from PIL import Image

    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,pixel_size\na.png,AML,0.25\nb.png,AML,\nc.png,AML,-1\n")
    found = discover(manifest, leukemia7)
    assert [s.pixel_size for s in found.samples] == [0.25, None]
    [problem] = [p for p in found.problems if p.kind == "bad_pixel_size"]
    assert problem.where == "m.csv line 4" and "found '-1'" in problem.message
    with pytest.raises(DataError, match=r"m.csv line 4: the 'pixel_size' cell must be"):
        collect_inputs([manifest])
