"""The one-patient HTML report."""

import numpy as np
import pytest
from PIL import Image

from leukotree.cli import main
from leukotree.errors import LeukotreeError
from leukotree.inference.options import InferenceOptions
from leukotree.models.checkpoint import save_model
from leukotree.models.heads import ModelConfig, build_model
from leukotree.report.patient import patient_report
from leukotree.taxonomy import load_taxonomy

TAX = load_taxonomy("leukemia7")


@pytest.fixture
def setup(tmp_path):
    model = build_model(TAX, ModelConfig(head="multihead", backbone="test_resnet", img_size=32))
    save_model(tmp_path / "best.pt", model, extra={"data": "synthetic", "train_images": 10,
                                                   "val_images": 5, "epoch": 3,
                                                   "metrics": {"val_accuracy": 0.5}})
    cells = tmp_path / "patient"
    cells.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            cells / f"c{i}.png")
    (cells / "c9.png").write_bytes(b"not a png")
    return tmp_path


def test_report_is_one_self_contained_page(setup):
    out = setup / "report.html"
    result = patient_report(setup / "best.pt", [setup / "patient"], out, patient="P-17",
                            options=InferenceOptions(confidence="0.0"), top_cells=3)
    page = out.read_text()
    assert result["n_cells"] == 5 and len(result["unreadable"]) == 1
    assert result["diagnosis"] in TAX.leaves and result["refer"] is False
    assert "Patient P-17" in page and "5 cells analysed (1 unreadable, 0 unclassifiable" in page
    assert page.count("<div class='cell'>") == 3
    assert page.count("data:image/png;base64,") == 6  # each cell and its heat map
    assert "src='http" not in page and 'src="http' not in page  # opens offline
    assert "Model card" in page and "val_accuracy" in page and "Leukemia" in page


def test_unconfident_levels_are_referred_and_too_few_cells_insufficient(setup):
    result = patient_report(setup / "best.pt", [setup / "patient"], setup / "r.html",
                            options=InferenceOptions(confidence="0.99"), heatmaps=False)
    assert result["refer"] is True
    assert "referral advised" in (setup / "r.html").read_text()
    result = patient_report(setup / "best.pt", [setup / "patient"], setup / "r2.html",
                            options=InferenceOptions(confidence="0.6", min_cells=50),
                            heatmaps=False)
    assert result["diagnosis"] is None and "Insufficient" in (setup / "r2.html").read_text()


def test_the_options_choose_the_aggregation_and_are_left_as_given(setup):
    options = InferenceOptions(aggregate="mean", confidence="0.0")
    before = options.to_dict()
    patient_report(setup / "best.pt", [setup / "patient"], setup / "m.html", options=options,
                   heatmaps=False)
    assert "aggregation: mean" in (setup / "m.html").read_text()
    assert options.to_dict() == before
    # without options: a majority vote, referred below the report's own confidence 0.6
    default = patient_report(setup / "best.pt", [setup / "patient"], setup / "d.html",
                             heatmaps=False)
    given = patient_report(setup / "best.pt", [setup / "patient"], setup / "g.html",
                           options=InferenceOptions(confidence="0.6"), heatmaps=False)
    assert "aggregation: majority" in (setup / "d.html").read_text()
    assert default | {"report": None} == given | {"report": None}


def test_report_cli_and_errors(setup, capsys):
    # the report is written; exit code 3 says that an input (c9.png, named) was unreadable
    assert main(["report", str(setup / "best.pt"), str(setup / "patient"), "--out",
                 str(setup / "cli.html"), "--no-heatmaps", "--no-progress"]) == 3
    assert (setup / "cli.html").exists()
    assert "c9.png" in capsys.readouterr().err
    assert "c9.png" in (setup / "cli.html").read_text()
    with pytest.raises(LeukotreeError, match="None of the given images"):
        patient_report(setup / "best.pt", [setup / "patient" / "c9.png"], setup / "x.html")


def test_unclassifiable_cells_are_left_out_and_an_unlike_patient_raises_the_alarm(setup):
    import torch

    from leukotree.models.checkpoint import update_checkpoint

    model = build_model(TAX, ModelConfig(head="multihead", backbone="test_resnet",
                                         img_size=32)).eval()
    with torch.no_grad():
        width = model(torch.zeros(1, 3, 32, 32))["features"].shape[1]
    ood = {"means": torch.zeros(1, width), "precision": torch.eye(width), "quantile": 0.95,
           "val_flagged": 0.05, "classes": ["ALL"]}
    update_checkpoint(setup / "best.pt", ood={**ood, "threshold": 1e-12})
    with pytest.raises(LeukotreeError, match="All 5 readable cells are unclassifiable"):
        patient_report(setup / "best.pt", [setup / "patient"], setup / "x.html",
                       heatmaps=False)
    update_checkpoint(setup / "best.pt", ood={**ood, "threshold": 1e12})
    result = patient_report(setup / "best.pt", [setup / "patient"], setup / "y.html",
                            heatmaps=False)
    assert result["n_unclassifiable"] == 0 and result["domain_shift"] is None


def test_report_shows_cells_decoded_at_the_given_pixel_size(tmp_path, capsys):
    from leukotree.data.images import load_rgb_array
    from leukotree.report.html import png_data_uri

    model = build_model(TAX, ModelConfig(head="flat", backbone="test_resnet", img_size=32,
                                         pixel_size=0.5, field_um=20.0))
    save_model(tmp_path / "best.pt", model)
    cells = tmp_path / "patient"
    cells.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), np.uint8)).save(
        cells / "c0.png")
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "best.pt"), str(cells), "--out", str(out),
                 "--pixel-size", "1.0", "--confidence", "0", "--no-heatmaps",
                 "--no-progress"]) == 0
    # 20 um at 1 um per pixel: the central 20 px, not the model's own 40 px view
    page = out.read_text()
    assert png_data_uri(load_rgb_array(cells / "c0.png", 32, window=20.0)) in page
    assert png_data_uri(load_rgb_array(cells / "c0.png", 32)) not in page


def test_a_cell_type_model_reports_a_differential_count(tmp_path, capsys):
    pbc = load_taxonomy("pbc")
    model = build_model(pbc, ModelConfig(head="multihead", backbone="test_resnet", img_size=32))
    save_model(tmp_path / "best.pt", model, extra={"data": "synthetic"})
    rng = np.random.default_rng(2)
    (tmp_path / "cells").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / "cells" / f"c{i}.png")
    out = tmp_path / "report.html"
    result = patient_report(tmp_path / "best.pt", [tmp_path / "cells"], out, patient="P-3",
                            heatmaps=False)
    assert result["kind"] == "cells" and result["diagnosis"] is None
    count = result["differential_count"]
    assert count["n_classified"] == 6 and [r["leaf"] for r in count["rows"]] == list(
        pbc.leaves)
    page = out.read_text()
    assert "id='differential-count'" in page and "grouped by predicted class" in page
    assert "Votes and mean probabilities" not in page  # no majority "diagnosis"
    assert main(["report", str(tmp_path / "best.pt"), str(tmp_path / "cells"), "--out",
                 str(out), "--no-heatmaps", "--no-progress"]) == 0
    assert "differential count of 6 cells" in capsys.readouterr().err
