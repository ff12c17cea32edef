"""Prediction: referral logic by hand, inputs, bad images, per-patient diagnoses."""

import csv

import numpy as np
import pytest

from leukotree.cli import main
from leukotree.config import resolve_config
from leukotree.errors import LeukotreeError
from leukotree.metrics import node_probabilities
from leukotree.predict import calibrate_thresholds, collect_inputs, decide, parse_thresholds
from leukotree.synth import generate
from leukotree.taxonomy import load_taxonomy
from leukotree.train import train

TAX = load_taxonomy("leukemia7")  # leaves: Normal Reactive ALL AML APML CLL CML


def _node_p(leaf_probs):
    return node_probabilities(TAX, np.array([leaf_probs], dtype=float))[0]


def test_decide_refers_at_the_first_unconfident_level():
    # P(Leukemia) = 0.9; P(Acute) = 0.8 -> P(Acute|Leukemia) = 0.889;
    # ALL 0.4, AML 0.35, APML 0.05 -> P(ALL|Acute) = 0.5
    p = _node_p([0.05, 0.05, 0.4, 0.35, 0.05, 0.05, 0.05])
    leaf, node, refer, conds = decide(TAX, p, [0.8, 0.8, 0.8])
    assert leaf == "ALL" and node == "Acute" and refer is True
    assert conds == pytest.approx([0.9, 0.8 / 0.9, 0.5])
    leaf, node, refer, _ = decide(TAX, p, [0.5, 0.5, 0.5])
    assert (leaf, node, refer) == ("ALL", "ALL", False)
    # a confident root choice of a depth-1 leaf is never referred at deeper levels
    leaf, node, refer, _ = decide(TAX, _node_p([0.9, 0.1, 0, 0, 0, 0, 0]), [0.8, 0.99, 0.99])
    assert (leaf, node, refer) == ("Normal", "Normal", False)


def test_greedy_and_argmax_decoding_can_differ():
    # Normal 0.3 is the most probable leaf, but Leukemia (0.6) beats Normal at the root.
    p = _node_p([0.3, 0.1, 0.2, 0.2, 0.2, 0.0, 0.0])
    assert decide(TAX, p, [0, 0, 0], "argmax")[0] == "Normal"
    assert decide(TAX, p, [0, 0, 0], "greedy")[0] in {"ALL", "AML", "APML"}
    with pytest.raises(LeukotreeError, match="decode"):
        decide(TAX, p, [0, 0, 0], "beam")


def test_parse_thresholds():
    assert parse_thresholds(None, 3) == [0, 0, 0]
    assert parse_thresholds("0.7", 3) == [0.7] * 3
    assert parse_thresholds("0.9,0.8,0.7", 3) == [0.9, 0.8, 0.7]
    for bad in ("0.9,0.8", "x", "1.5"):
        with pytest.raises(LeukotreeError, match="confidence"):
            parse_thresholds(bad, 3)


def test_calibrated_thresholds_meet_the_target_error():
    rng = np.random.default_rng(0)
    truth, probs = [], []
    for _ in range(200):
        leaf = int(rng.integers(0, 7))
        row = rng.dirichlet(np.ones(7))
        row[leaf] += rng.uniform(0, 2)
        truth.append(TAX.leaves[leaf])
        probs.append(row / row.sum())
    probs = np.array(probs)
    thresholds = calibrate_thresholds(TAX, truth, probs, target_error=0.1)
    node_p = node_probabilities(TAX, probs)
    # root level: accepted decisions (conf >= threshold) err at most 10 %
    cols = [TAX.node_index[c] for c in TAX.children(TAX.root)]
    conf = node_p[:, cols].max(1)
    hit = node_p[:, cols].argmax(1) == TAX.encode_heads(truth)[:, 0]
    accepted = conf >= thresholds[0]
    assert accepted.any()
    assert 1 - hit[accepted].mean() <= 0.1 + 1e-9


def test_collect_inputs_from_files_folders_and_manifests(tmp_path):
    (tmp_path / "P1").mkdir()
    (tmp_path / "P1" / "a.png").write_bytes(b"x")
    (tmp_path / "P1" / "notes.txt").write_text("ignored: not an image")
    (tmp_path / "m.csv").write_text("path,patient\nP1/a.png,77\n")
    got = collect_inputs([tmp_path / "P1", tmp_path / "m.csv"], patients="folder")
    assert [(i.path.name, i.patient) for i in got] == [("a.png", "P1"), ("a.png", "P1")]
    got = collect_inputs([tmp_path / "m.csv"])
    assert got[0].patient == "77"
    with pytest.raises(LeukotreeError, match="does not exist"):
        collect_inputs([tmp_path / "missing.png"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    data = root / "data"
    generate(data, TAX, patients_per_class=3, cells_per_patient=4, size=32, seed=2,
             progress=False)
    train(data, root / "run", resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "threads": 1, "val_fraction": 0.3}), progress=False)
    return root


def test_predict_cli_reports_a_bad_image_and_predicts_the_rest(run, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "preds.csv"
    code = main(["predict", str(run / "run"), str(run / "data" / "ALL"), str(bad),
                 "--patients", "folder", "--by-patient", "--out", str(out), "--no-progress",
                 "--confidence", "0.6"])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 * 4 + 1
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert len(broken) == 1 and "broken.png" in broken[0]["error"]
    for r in rows:
        if r["error"]:
            continue
        p = {k[2:]: float(v) for k, v in r.items() if k.startswith("p_")}
        # children sum to their parent; a child never exceeds its parent
        assert p["Normal"] + p["Reactive"] + p["Leukemia"] == pytest.approx(1, abs=1e-4)
        assert p["ALL"] + p["AML"] + p["APML"] == pytest.approx(p["Acute"], abs=1e-4)
        assert p["Acute"] <= p["Leukemia"] + 1e-6
        assert r["decoded_path"].endswith(r["predicted_leaf"])
        assert (r["refer"] == "True") == (r["reported_node"] != r["predicted_leaf"])
    patients = list(csv.DictReader((tmp_path / "preds_patients.csv").open()))
    # the unreadable image belongs to no patient; the three ALL patients remain
    assert {p["patient"] for p in patients} == {"ALL-p000", "ALL-p001", "ALL-p002"}
    assert all(int(p["n_cells"]) == 4 for p in patients)
    assert "1 unreadable" in capsys.readouterr().err


def test_predict_by_patient_without_ids_is_a_clear_error(run, capsys):
    code = main(["predict", str(run / "run"), str(run / "data" / "CLL"), "--by-patient",
                 "--no-progress"])
    assert code == 2
    assert "patient ids" in capsys.readouterr().err


def test_dihedral_averaging_is_invariant_to_rotations_and_flips():
    import torch

    from leukotree.inference import dihedral_mean
    from leukotree.models import ModelConfig, build_model

    model = build_model(TAX, ModelConfig(head="multihead", backbone="test_resnet",
                                         img_size=32)).eval()
    x = torch.rand(2, 3, 32, 32) * 255
    with torch.no_grad():
        base = dihedral_mean(model, x)
        turned = dihedral_mean(model, torch.rot90(x, 1, dims=(2, 3)).flip(3))
        plain = model(x)["leaf_logp"].exp()
    assert torch.allclose(base, turned, atol=1e-5)
    assert torch.allclose(base.sum(1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(base, plain, atol=1e-4)  # averaging changes the answer
