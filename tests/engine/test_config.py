"""Options: one definition for the command line and for validation."""

import argparse
from dataclasses import fields

import pytest

from leukotree.cli import build_parser, main
from leukotree.engine.config import TrainConfig, add_config_arguments, check_value, resolve_config
from leukotree.errors import LeukotreeError
from leukotree.models import ModelConfig


def _parse(*argv):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(parser)
    return parser.parse_args(list(argv))


def test_every_option_has_a_flag_or_is_marked_config_file_only():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    dests = {a.dest for a in parser._actions}
    for f in fields(TrainConfig):
        assert (f.name in dests) == f.metadata["cli"], f.name
        assert f.metadata["help"], f"{f.name} has no help"


def test_flags_convert_and_unset_flags_do_not_override():
    args = _parse("--lr", "0.01", "--no-augment", "--hybrid-backbones", "vgg16, resnet18",
                  "--val", "v.csv")
    assert args.lr == 0.01 and args.augment is False and args.val_data == "v.csv"
    assert args.hybrid_backbones == ["vgg16", "resnet18"]
    assert args.epochs is None and args.pretrained is None


@pytest.mark.parametrize("flag,value,rule", [
    ("--lr", "nan", "(0, 10]"), ("--lr", "inf", "(0, 10]"), ("--lr", "-1", "(0, 10]"),
    ("--drop-rate", "1.5", "[0, 1)"), ("--threads", "-1", "[0, 4096]"),
    ("--batch-size", "0", "[1, 65536]"), ("--patience", "-2", "[0, 100000]"),
    ("--focal-gamma", "-1", "[0, 10]"), ("--warmup-epochs", "-0.5", "[0, 100000]"),
    ("--optimizer", "adamx", "adamw, adam, sgd"), ("--epochs", "2.5", "must be int"),
])
def test_impossible_values_are_refused_at_parse_time_with_the_rule(flag, value, rule, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "d", "--out", "o", flag, value])
    err = capsys.readouterr().err
    assert flag in err and rule in err


@pytest.mark.parametrize("key,value,match", [
    ("lr", float("nan"), "'lr' parameter must be in"),
    ("ema_decay", 1.0, "'ema_decay' parameter must be in"),
    ("img_size", True, "must be int"),
    ("loss", "hinge", "one of focal, ce, weighted-ce"),
])
def test_config_files_get_the_same_rules(tmp_path, key, value, match):
    with pytest.raises(LeukotreeError, match=match):
        resolve_config(overrides={key: value})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{key}: {value!r}\n".replace("'", ""))
    with pytest.raises(LeukotreeError):
        resolve_config(config_file=cfg)


def test_check_value_accepts_what_the_rules_allow():
    assert check_value("crop_fraction", 1) == 1.0
    assert check_value("fold", None) is None
    assert check_value("level_weights", "1, 0.5") == [1.0, 0.5]


def test_a_number_in_a_config_file_is_read_as_text_where_text_is_expected(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("patient_threshold: 0.5\n")
    assert resolve_config(config_file=cfg).patient_threshold == "0.5"
    cfg.write_text("patient_threshold: true\n")
    with pytest.raises(LeukotreeError, match="must be str; got True"):
        resolve_config(config_file=cfg)


@pytest.mark.parametrize("flag,value,match", [
    ("--head", "multi-head", "Unknown head 'multi-head'"),
    ("--model", "resnet19", "Unknown backbone 'resnet19'"),
    ("--patients", "folders", "Invalid --patients value"),
    ("--device", "tpu", "'device' parameter"),
    ("--img-size", "40", "needs at least 75 pixels"),
])
def test_names_are_checked_before_any_image_is_read(tmp_path, capsys, flag, value, match):
    extra = ["--model", "inception_v3"] if flag == "--img-size" else []
    code = main(["train", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "run"),
                 flag, value, *extra])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "does not exist" not in err
    assert not (tmp_path / "run").exists()


def test_fold_must_be_below_folds():
    with pytest.raises(LeukotreeError, match=r"0\.\.2 for 3 folds"):
        resolve_config(overrides={"fold": 3, "folds": 3})


def test_model_config_refuses_unknown_keys():
    data = ModelConfig().to_dict() | {"stain_matrix": [1, 2]}
    with pytest.raises(LeukotreeError, match=r"unknown key\(s\) \['stain_matrix'\].*newer"):
        ModelConfig.from_dict(data, source="'x.pt'")


@pytest.mark.parametrize("preset,backbone", [("paper-convnext", "convnext_tiny"),
                                             ("paper-vit", "vit_small_patch16_224")])
def test_the_papers_gpu_recipes_start_on_a_cpu(preset, backbone):
    import torch

    from leukotree.models import build_model
    from leukotree.taxonomy import load_taxonomy

    cfg = resolve_config(preset=preset, overrides={"img_size": 64})  # 224 px on a GPU
    assert (cfg.model, cfg.epochs, cfg.loss, cfg.optimizer, cfg.folds) == (
        backbone, 80, "focal", "adamw", 5)
    model = build_model(load_taxonomy("leukemia7"), cfg.model_config())
    loss = model(torch.rand(2, 3, 64, 64) * 255)["leaf_logp"].logsumexp(1).sum()
    loss.backward()  # a training step runs
    assert all(p.grad is not None for p in model.heads.parameters())


def test_group_norm_refuses_pretrained_weights_and_the_hybrid_head():
    for extra in ({"pretrained": True}, {"head": "hybrid"}):
        with pytest.raises(LeukotreeError, match="'norm' parameter 'group'"):
            resolve_config(preset="tiny-test", overrides={"norm": "group", **extra})
    assert resolve_config(preset="tiny-test", overrides={"norm": "group"}).norm == "group"


def test_a_config_saved_before_fold_val_fraction_keeps_its_meaning(tmp_path):
    from leukotree.engine.config import load_config, resume_config, save_config

    for fold, expected in ((None, 0.15), (1, 0.0)):
        path = tmp_path / f"config-{fold}.yaml"
        save_config(resolve_config(preset="tiny-test", overrides={"fold": fold}), path)
        path.write_text("".join(line for line in path.read_text().splitlines(True)
                                if not line.startswith("fold_val_fraction")))
        saved = load_config(path, check_device=False)
        # a fold then validated on its own images; elsewhere the option has no effect
        assert saved.fold_val_fraction == expected
    # an older run that is not a fold resumes with its preset given again
    saved = load_config(tmp_path / "config-None.yaml", check_device=False)
    assert resume_config(saved, resolve_config(preset="tiny-test"))[1] == []


def test_a_patient_miss_rate_needs_two_leaves_and_a_patient_model(tmp_path, capsys):
    with pytest.raises(LeukotreeError, match=r"taxonomy 'leukemia7' has 7 leaves\. Give a "
                                             "two-leaf taxonomy"):
        resolve_config(preset="tiny-test", overrides={"patient_miss_rate": 0.1,
                                                      "patient_model": "mean"})
    with pytest.raises(LeukotreeError, match="patient_model is none: give one with "
                                             "--patient-model"):
        resolve_config(preset="tiny-test", overrides={"taxonomy": "aml-apl",
                                                      "patient_miss_rate": 0.1})
    cfg = resolve_config(preset="tiny-test", overrides={
        "taxonomy": "aml-apl", "patient_model": "mean", "patient_miss_rate": 0.2,
        "patient_miss_confidence": 0.8})
    assert (cfg.patient_miss_rate, cfg.patient_miss_confidence) == (0.2, 0.8)
    for flag, value in (("--confidence", "1"), ("--patient-miss-rate", "0")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "d", "--out", "o", flag, value])
        assert flag in capsys.readouterr().err
    code = main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                 "--patient-miss-rate", "0.1", "--patient-model", "mean"])
    assert code == 2 and "has 7 leaves" in capsys.readouterr().err  # before any image
