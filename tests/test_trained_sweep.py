"""Guidance trained in, in a sweep: MG and GFT models sampled beside the sweep's own (`sweep.trained_ckpts`) on the
same noise, each cell identical to sampling that model directly; their training cost in the rows, the report and
the cost figure; and the checks that refuse a wrong model or grid before any sampling."""

import math

import pytest
import torch

from lightning_modules.diffusion import OptionError
from lightning_modules.diffusion.guidance_training import cost_totals, objective_text
from lightning_modules.sweep import SweepStore, run_sweep
from lightning_modules.sweep.loading import load_diffusion, load_trained_networks
from lightning_modules.sweep.models import SweepModels
from lightning_modules.sweep.planning import check_trained_guidance, signatures
from lightning_modules.sweep.report import write_outputs

from .test_sweep_engine import HP, config, make_models, toy_evaluation


@pytest.fixture(scope="module")
def evaluation():
    return toy_evaluation()


MAIN_COST = {"objective": "none", "flops_per_step": 1.5e9, "steps": 10, "seconds": 3.0, "init": None}


def trained_models(gft_range=(0.0, 1.0)) -> SweepModels:
    """A label-dropout model with an MG and a GFT model of the same data beside it, each with a recorded cost (the
    GFT one fine-tuned from the first)."""
    main = make_models()
    mg = make_models(seed=1, guidance_training="mg", mg_scale=0.45, mg_high=0.75).diffusion
    gft = make_models(seed=2, guidance_training="gft", gft_beta_range=list(gft_range)).diffusion
    main.diffusion.training_cost = MAIN_COST
    mg.training_cost = {"objective": "mg", "flops_per_step": 2.5e9, "steps": 10, "seconds": 5.0, "init": None}
    gft.training_cost = {"objective": "gft", "flops_per_step": 2e9, "steps": 4, "seconds": 1.0, "init": MAIN_COST}
    return SweepModels(main.diffusion, main.classifier, trained={"mg": mg, "gft": gft})


def trained_config(tmp_path, **kw):
    return config(tmp_path, methods=["cfg", "mg", "gft"], scales={"cfg": [1.0, 2.0], "mg": [0.45], "gft": [1.0, 2.0]},
                  trained_ckpts={"mg": "MG.ckpt", "gft": "GFT.ckpt"}, classifier_ckpt=None, **kw)


def by_cell(rows):
    return {(r["method"], r["scale"]): r for r in rows}


def test_each_trained_in_method_samples_its_own_model_as_sampling_it_directly_would(tmp_path, evaluation):
    models = trained_models()
    rows = by_cell(run_sweep(trained_config(tmp_path / "all"), models, evaluation, SweepStore(tmp_path / "all")))
    assert rows[("cfg", 1.0)]["diffusion_sha"] == models.diffusion.sha
    assert rows[("mg", 0.45)]["diffusion_sha"] == models.trained["mg"].sha
    assert rows[("gft", 2.0)]["diffusion_sha"] == models.trained["gft"].sha
    # gft at s = 1 and mg are plain conditional cells, but of other networks: sampled, not copied from cfg s = 1.
    assert rows[("gft", 1.0)]["same_as"] == "" and rows[("mg", 0.45)]["same_as"] == ""
    assert rows[("gft", 1.0)]["fid"] != rows[("cfg", 1.0)]["fid"]
    assert rows[("mg", 0.45)]["gamma"] == pytest.approx(1 / (1 - 0.45))

    # The same cells with each model as the sweep's own: identical numbers (same noise, same network, same rule).
    alone = {}
    for method, grid in (("mg", [0.45]), ("gft", [1.0, 2.0])):
        own = SweepModels(models.trained[method])
        out = tmp_path / method
        cfg = config(out, methods=[method], scales={method: grid}, classifier_ckpt=None)
        alone.update(by_cell(run_sweep(cfg, own, evaluation, SweepStore(out))))
    for cell, row in alone.items():
        assert rows[cell]["fid"] == row["fid"] and rows[cell]["accuracy"] == row["accuracy"], cell
        assert rows[cell]["diffusion_sha"] == row["diffusion_sha"]


def test_rows_carry_each_models_objective_and_training_cost_a_fine_tune_its_start_included(tmp_path, evaluation):
    models = trained_models()
    rows = by_cell(run_sweep(trained_config(tmp_path), models, evaluation, SweepStore(tmp_path)))
    cfg, mg, gft = rows[("cfg", 2.0)], rows[("mg", 0.45)], rows[("gft", 2.0)]
    assert (cfg["training_objective"], mg["training_objective"]) == ("none", "mg w=0.45 t<0.75")
    assert gft["training_objective"] == "gft β∈[0, 1]"
    assert cfg["training_flops"] == 1.5e9 * 10 and mg["training_flops"] == 2.5e9 * 10
    assert gft["training_flops"] == 2e9 * 4 + 1.5e9 * 10 and gft["training_steps"] == 14
    assert gft["training_seconds"] == 4.0
    # Sampling cost: one evaluation per step, in main-network equivalents by FLOPs (GFT's β map is a little extra).
    steps = cfg["steps"]
    assert mg["nfe_per_sample"] == gft["nfe_per_sample"] == steps and cfg["nfe_per_sample"] == 2 * steps
    assert mg["unet_equivalents_per_sample"] == steps
    assert steps < gft["unet_equivalents_per_sample"] < 1.05 * steps

    # The report's section and the cost figure's training panel.
    write_outputs(list(rows.values()), tmp_path / "report", {"dataset": "toy"})
    report = (tmp_path / "report" / "report.md").read_text()
    section = report.split("## Training cost beside sampling cost", 1)[1].split("\n## ", 1)[0]
    for network in (models.diffusion, *models.trained.values()):
        assert f"`{network.sha}`" in section
    assert "| gft β∈[0, 1] | 23 GFLOP | 1.53× |" in section and "15 GFLOP" in section
    assert (tmp_path / "report" / "best_fid_vs_cost.png").stat().st_size > 0


def test_a_trained_models_weights_and_objective_enter_its_methods_signature_only(tmp_path, evaluation):
    models = trained_models()
    before = signatures(trained_config(tmp_path), models, evaluation, False)
    models.trained["mg"] = make_models(seed=3, guidance_training="mg", mg_scale=0.45, mg_high=0.75).diffusion
    after = signatures(trained_config(tmp_path), models, evaluation, False)
    assert before["mg"] != after["mg"] and before["cfg"] == after["cfg"] and before["gft"] == after["gft"]


def test_wrong_models_and_grids_are_refused_before_sampling(tmp_path):
    models = trained_models(gft_range=(0.25, 1.0))
    check_trained_guidance(trained_config(tmp_path), models)
    with pytest.raises(OptionError, match=r"sweep.scales.mg.*w = 0.45 the MG model was trained with.*\[0.45\]"):
        check_trained_guidance(config(tmp_path, methods=["mg"], scales={"mg": [0.3]}, trained_ckpts={"mg": "x"},
                                      classifier_ckpt=None), models)
    with pytest.raises(OptionError, match=r"sweep.scales.gft.*past s = 1/β_min = 4"):
        check_trained_guidance(config(tmp_path, methods=["gft"], scales={"gft": [1.0, 5.0]},
                                      trained_ckpts={"gft": "x"}, classifier_ckpt=None), models)
    with pytest.raises(OptionError, match=r"sweep.trained_ckpts.*\['cfg'\] are not trained-in methods"):
        config(tmp_path, methods=["cfg"], scales=None, trained_ckpts={"cfg": "x"})
    models.trained["gft"] = make_models(seed=4).diffusion  # a label-dropout model where the GFT one should be
    with pytest.raises(OptionError, match="sweep.trained_ckpts.gft.*trained with guidance_training gft, but its"):
        check_trained_guidance(trained_config(tmp_path), models)


def save_checkpoint(path, network, cost):
    state = {f"ema_net.{k}": v for k, v in network.net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": network.hparams, "global_step": 7, "training_cost": cost},
               path)


def test_checkpoints_are_loaded_with_their_cost_and_checked_against_the_method(tmp_path):
    mg = make_models(seed=1, guidance_training="mg", mg_scale=0.45).diffusion
    plain = make_models().diffusion
    save_checkpoint(tmp_path / "mg.ckpt", mg, {"flops_per_step": 2.0, "steps": 7, "seconds": 1.0})
    save_checkpoint(tmp_path / "plain.ckpt", plain, None)
    loaded = load_diffusion(tmp_path / "mg.ckpt")
    assert loaded.sha == mg.sha and loaded.training_cost["steps"] == 7
    assert math.isnan(cost_totals(load_diffusion(tmp_path / "plain.ckpt").training_cost)["flops"])
    cfg = config(tmp_path, methods=["mg"], scales={"mg": [0.45]}, trained_ckpts={"mg": str(tmp_path / "mg.ckpt")},
                 classifier_ckpt=None)
    assert load_trained_networks(cfg, HP)["mg"].sha == mg.sha
    cfg.trained_ckpts = {"mg": str(tmp_path / "plain.ckpt")}
    with pytest.raises(OptionError, match=r"sweep.trained_ckpts.mg.*plain.ckpt was trained with guidance_training "
                                          r"none, not mg"):
        load_trained_networks(cfg, HP)
    with pytest.raises(OptionError, match=r"sweep.trained_ckpts.mg.*does not match the diffusion model"):
        load_trained_networks(cfg, {**HP, "image_size": 16})


def test_cost_totals_charge_a_fine_tune_for_the_fits_before_it():
    scratch = {"flops_per_step": 3.0, "steps": 10, "seconds": 2.0, "init": None}
    tune = {"flops_per_step": 4.0, "steps": 5, "seconds": 1.0, "init": {**scratch, "init": None}}
    twice = {"flops_per_step": 1.0, "steps": 2, "seconds": 0.5, "init": tune}
    assert cost_totals(scratch) == {"flops": 30.0, "seconds": 2.0, "steps": 10}
    assert cost_totals(twice) == {"flops": 2.0 + 20.0 + 30.0, "seconds": 3.5, "steps": 17}
    assert all(math.isnan(v) for v in cost_totals(None).values())
    assert all(math.isnan(v) for v in cost_totals({**tune, "init": {"unrecorded": True}}).values())
    assert objective_text({"guidance_training": "gft", "gft_beta_range": [0.0, 1.0], "init_from": "a.ckpt"}) \
        == "gft β∈[0, 1] + init"
