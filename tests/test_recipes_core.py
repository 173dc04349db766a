"""Layer selection, routers, loss-weighting recipes and adapters: units, then tiny end-to-end runs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import train_tiny
from omegaconf import OmegaConf
from torch import nn

from mode_cli.config import LossConfig
from mode_cli.mode.head import MoDEHead
from mode_cli.mode.selection import every_n, explicit, fraction_of_depth, last_k
from mode_cli.mode.weighting import curriculum, layer_scale, loss_weights

# ---------------------------------------------------------------------------- layer selection


def test_layer_selection_rules():
    assert last_k(30, 3) == [28, 29, 30]
    assert every_n(30, 2, 8) == [24, 26, 28, 30]
    assert every_n(30, 3, 7) == [24, 27, 30]
    assert fraction_of_depth(30, 0.1) == [28, 29, 30]
    assert fraction_of_depth(30, 0.25) == [23, 24, 25, 26, 27, 28, 29, 30]
    assert fraction_of_depth(4, 0.01) == [4]
    assert explicit(30, [-1, -2, -4]) == [27, 29, 30]
    assert explicit(30, [10, 20]) == [10, 20, 30]  # the final layer is always in


@pytest.mark.parametrize(
    ("rule", "args"),
    [
        (last_k, (7,)),
        (every_n, (2, 9)),
        (explicit, ([99],)),
        (explicit, ([-7],)),
        (explicit, ([0],)),
    ],
)
def test_out_of_range_selection_names_the_depth(rule, args):
    with pytest.raises(ValueError, match="6 layers"):
        rule(6, *args)


# ---------------------------------------------------------------------------- routers


class Norm(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x):
        return self.weight * x


def states(layers, tokens=5, hidden=8, grad=False):
    return {layer: torch.randn(tokens, hidden, requires_grad=grad) for layer in layers}


def test_router_kinds_and_their_starting_weights():
    layers = [3, 4, 5]
    token = MoDEHead(Norm(), layers, 5, 8, router="token", init_final_weight=0.8)
    scalar = MoDEHead(Norm(), layers, 5, 8, router="scalar", init_final_weight=0.8)
    fixed = MoDEHead(Norm(), layers, 5, 8, router="fixed", fixed_weights=[1, 1, 2])
    uniform = MoDEHead(Norm(), layers, 5, 8, router="token", init_final_weight=None)
    none = MoDEHead(Norm(), layers, 5, 8, router="none")
    x = states(layers)
    expected = torch.tensor([0.1, 0.1, 0.8])
    for head in (token, scalar):
        torch.testing.assert_close(head(x)[1], expected.expand(5, 3))
    torch.testing.assert_close(fixed(x)[1], torch.tensor([0.25, 0.25, 0.5]).expand(5, 3))
    torch.testing.assert_close(uniform(x)[1], torch.full((5, 3), 1 / 3))
    assert none(x)[1] is None
    # A fixed router trains nothing but the norms; a scalar one adds one logit per layer.
    assert sum(p.numel() for p in fixed.parameters()) == 2 * 8
    assert sum(p.numel() for p in scalar.parameters()) == 2 * 8 + 3
    assert sum(p.numel() for p in token.parameters()) == 2 * 8 + 8 * 3 + 3


@pytest.mark.parametrize("router_input", ["final", "mean"])
def test_detached_router_input_stops_its_gradient(router_input):
    layers = [4, 5]
    for detach in (False, True):
        head = MoDEHead(Norm(), layers, 5, 8, router_input=router_input, detach_input=detach)
        nn.init.normal_(head.router.weight)
        x = states(layers, grad=True)
        _, weights = head(x)
        weights[:, 0].sum().backward()
        reached = x[5].grad is not None and x[5].grad.abs().sum() > 0
        assert reached is not detach
        assert head.router.weight.grad.abs().sum() > 0


def test_head_description_round_trips():
    head = MoDEHead(
        Norm(), [2, 4, 5], 5, 8, router="fixed", fixed_weights=[1, 2, 7], detach_input=True
    )
    again = MoDEHead.from_description(Norm(), json.loads(json.dumps(head.describe())))
    assert again.describe() == head.describe()
    torch.testing.assert_close(again.fixed_weights, torch.tensor([0.1, 0.2, 0.7]))


# ---------------------------------------------------------------------------- loss weighting


@pytest.mark.parametrize("rule", ["uniform", "linear", "sqrt", "inverse", "inverse_sqrt"])
def test_layer_scales_sum_to_one(rule):
    weights = layer_scale([27, 28, 29, 30], rule)
    assert sum(weights) == pytest.approx(1.0)
    assert all(w > 0 for w in weights)


def test_layer_scale_shapes():
    assert layer_scale([1, 2, 3], "linear") == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    inverse = layer_scale([1, 2, 4], "inverse")
    assert inverse == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert layer_scale([5, 9], "uniform") == [0.5, 0.5]


def test_curricula():
    assert curriculum(4, "none", 3, 10, 1) == [True] * 4
    rotations = [curriculum(4, "rotational", step, 10, 2) for step in range(1, 8)]
    assert rotations[0] == rotations[1] == [True, False, False, True]
    assert rotations[2] == [False, True, False, True]
    assert rotations[4] == [False, False, True, True]
    assert rotations[6] == [True, False, False, True]
    assert curriculum(4, "gradual", 1, 8, 1) == [False, False, False, True]
    assert curriculum(4, "gradual", 4, 8, 1) == [False, False, True, True]
    assert curriculum(4, "gradual", 8, 8, 1) == [True, True, True, True]


def loss_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(LossConfig), values)


def test_loss_recipes_to_weights():
    layers = [2, 3, 4]
    mode = loss_weights(loss_cfg(name="mode"), layers, 1, 10)
    assert (mode.ensemble, mode.layers, mode.distill, mode.teacher) == (1.0, (), 0.1, "final")
    nodistill = loss_weights(loss_cfg(name="mode-nodistill", distill_weight=0.3), layers, 1, 10)
    assert nodistill.distill == 0.0
    with_layers = loss_weights(loss_cfg(name="mode", layer_weight=0.2), layers, 1, 10)
    assert with_layers.layers == (0.2, 0.2, 0.2)
    layerwise = loss_weights(
        loss_cfg(name="layerwise", scale="linear", distill_weight=0.0), layers, 1, 10
    )
    assert layerwise.ensemble == 0.0
    assert layerwise.layers == pytest.approx((2 / 9, 3 / 9, 4 / 9))
    rotating = loss_cfg(name="layerwise", scale="uniform", curriculum="rotational")
    assert loss_weights(rotating, layers, 2, 10).layers == pytest.approx((0.0, 0.5, 0.5))


# ---------------------------------------------------------------------------- end to end


def train(mode, out, *overrides):
    from mode_cli.eval.report import latest_report

    train_tiny(mode, out, "train.max_steps=2", "eval.max_examples=4", *overrides)
    return json.loads(latest_report(out).read_text())


LOSSES = ["mode", "mode-nodistill", "final-only", "layerwise", "layerwise-rotational", "mode-only"]


@pytest.mark.parametrize("adapter", ["lora-small", "dora-small"])
@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_recipe_trains_with_each_adapter(mode, tmp_path, adapter, loss):
    if loss == "mode-only" and adapter != "lora-small":
        pytest.skip("mode-only trains no adapter")
    report = train(mode, tmp_path / "run", f"adapter={adapter}", f"loss={loss}", "layers=last4")
    run = tmp_path / "run"
    assert (run / "adapter").exists() is (loss != "mode-only")
    assert (run / "mode_head.json").exists() is (loss != "final-only")
    assert (report["ensemble"] is None) is (
        loss in ("final-only", "layerwise", "layerwise-rotational")
    )
    if adapter == "dora-small" and loss != "mode-only":
        config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert config["use_dora"] is True


@pytest.mark.parametrize("router", ["scalar", "fixed", "token-uniform"])
def test_router_recipes_train_and_evaluate(mode, tmp_path, router):
    report = train(mode, tmp_path / "run", f"router={router}")
    weights = [row["router_weight"]["mean"] for row in report["layers"] if row["selected"]]
    assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    if router == "fixed":
        assert weights == pytest.approx([0.05, 0.05, 0.9], abs=1e-6)
    code, _, err = mode("eval", f"checkpoint={tmp_path / 'run'}", "eval.compare_base=false")
    assert code == 0, err


@pytest.mark.parametrize(
    ("layers", "selected"),
    [
        (["layers=every2-last8", "layers.of_last=4"], [2, 4]),
        (["layers=indices"], [1, 3, 4]),
        (["layers=quarter"], [4]),
        (["layers.indices=[-3,2]"], [2, 4]),
    ],
)
def test_layer_recipes_select_what_they_say(mode, tmp_path, layers, selected):
    report = train(mode, tmp_path / "run", *layers)
    assert report["selected_layers"] == selected


def test_mode_only_run_evaluates(mode, tmp_path):
    train(mode, tmp_path / "run", "loss=mode-only")
    code, _, err = mode("eval", f"checkpoint={tmp_path / 'run'}")
    assert code == 0, err


@pytest.mark.parametrize("bad", ["layers.indices=[99]", "layers.k=9", "layers=every2-last8"])
def test_bad_layer_selection_names_the_depth(mode, tmp_path, bad):
    code, _, err = mode("train", "recipe=tiny-llama-alpaca", f"output_dir={tmp_path / 'r'}", bad)
    assert code == 2
    assert "4 layers" in err
    assert not (tmp_path / "r").exists()
