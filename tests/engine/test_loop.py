"""The reusable training pieces: schedule, weight average, step, devices."""

import pytest
import torch

from leukotree.engine.config import resolve_config
from leukotree.engine.loop import make_scheduler, weight_average
from leukotree.errors import LeukotreeError


@pytest.mark.parametrize("epochs,steps", [(1, 1), (1, 2), (3, 1), (24, 64)])
def test_one_cycle_schedule_works_for_any_run_length(epochs, steps):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    cfg = resolve_config(overrides={"schedule": "onecycle", "lr": 1e-3, "epochs": epochs})
    scheduler = make_scheduler(opt, cfg, steps)
    rates = []
    for _ in range(epochs * steps):
        opt.step()
        scheduler.step()
        rates.append(opt.param_groups[0]["lr"])
    assert all(0 < r <= 1e-3 + 1e-12 for r in rates)


def test_weight_average_hand_computed():
    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema = weight_average(layer, 0.75)
    ema.update_parameters(layer)  # the first update copies the weights
    with torch.no_grad():
        layer.weight.fill_(3.0)
    ema.update_parameters(layer)  # 0.75 * 1 + 0.25 * 3
    assert ema.module.weight.item() == pytest.approx(1.5)
    assert weight_average(layer, 0.0) is None
    with pytest.raises(LeukotreeError, match="'ema_decay'"):
        resolve_config(overrides={"ema_decay": 1.0})


def test_a_non_finite_loss_stops_the_step_before_any_weight_changes():
    from leukotree.engine.loop import Precision, TrainState, make_optimizer, train_step
    from leukotree.models import ModelConfig, build_model
    from leukotree.models.losses import TreeLoss
    from leukotree.taxonomy import load_taxonomy

    tax = load_taxonomy("leukemia7")
    model = build_model(tax, ModelConfig(head="multihead", backbone="test_resnet", img_size=32))
    cfg = resolve_config(preset="tiny-test")
    opt = make_optimizer(model, cfg)
    state = TrainState(model, opt, make_scheduler(opt, cfg, 4), torch.amp.GradScaler(enabled=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    labels = ["ALL", "CLL"]
    x = torch.full((2, 3, 32, 32), float("nan"))
    mask = torch.from_numpy(tax.leaf_mask(labels))
    heads = torch.from_numpy(tax.encode_heads(labels))
    crit = TreeLoss(tax, hierarchical=True)
    with pytest.raises(LeukotreeError, match=r"training loss became nan.*lower --lr"):
        train_step(model, state, crit, x, mask, heads, Precision(torch.device("cpu")))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k
               and "num_batches" not in k)


def test_ranks_draw_different_augmentations_and_rank_0_draws_the_single_process_ones():
    from leukotree.engine.loop import epoch_generator

    single = torch.rand(4, generator=epoch_generator(3, 2))
    assert torch.equal(torch.rand(4, generator=epoch_generator(3, 2, rank=0)), single)
    assert not torch.equal(torch.rand(4, generator=epoch_generator(3, 2, rank=1)), single)


def test_resuming_with_another_number_of_processes_is_refused():
    from leukotree.engine.loop import TrainState, make_optimizer

    model = torch.nn.Linear(2, 2)
    cfg = resolve_config(preset="tiny-test")
    opt = make_optimizer(model, cfg)
    saved = TrainState(model, opt, make_scheduler(opt, cfg, 4),
                       torch.amp.GradScaler(enabled=False), world_size=2).state_dict()
    fresh = TrainState(model, opt, make_scheduler(opt, cfg, 4),
                       torch.amp.GradScaler(enabled=False), world_size=1)
    with pytest.raises(LeukotreeError, match=r"trained by 2 process.*nproc_per_node 2"):
        fresh.load_state_dict(saved)
