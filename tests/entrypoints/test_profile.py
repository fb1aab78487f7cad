"""`loong-jax profile` end to end on the tiny checkpoint (the real programs on 2 of the 8 CPU devices), its
command line, its grid, and the engine's choice between a shipped measured cost model and the roofline."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from loong_jax.entrypoints.cli import main as cli_main
from loong_jax.entrypoints.engine_config import engine_cost_model, measured_cost_model, model_shape
from loong_jax.models.config import ModelConfig
from loong_jax.models.demo import DEMO_MODEL_DIR
from loong_jax.entrypoints.profile_cli import grid_from_args, parse_degrees, profile_parser
from loong_jax.entrypoints.profiler import ProfileGrid, degrees_for, grid_blocks, member_pages, split_evenly, spread_placement
from loong_jax.scheduler.cost.model import SHIPPED_DIR, CostModel, DecodeSample, MigrationSample, PrefillSample
from loong_jax.scheduler.cost.fit import fit_cost_model
from loong_jax.scheduler.cost.model import sample_from_dict

SHIPPED_CPU = SHIPPED_DIR / "cpu_demo.json"


def read_samples(path):
    return [sample_from_dict(json.loads(line)) for line in path.read_text().splitlines()]


def test_profile_quick_end_to_end(checkpoint_dir, compile_cache_dir, tmp_path, capsys):
    out, samples_out = tmp_path / "profile.json", tmp_path / "samples.jsonl"
    code = cli_main(["profile", "--model", str(checkpoint_dir), "--instances", "2", "--quick", "--repetitions", "1",
                     "--out", str(out), "--samples-out", str(samples_out), "--no-progress", "--name", "tiny",
                     "--compilation-cache-dir", str(compile_cache_dir)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "overall: mean relative error" in printed and "worst samples:" in printed
    model = CostModel.load_json(out)
    samples = read_samples(samples_out)
    kinds = {type(s) for s in samples}
    assert kinds == {PrefillSample, DecodeSample, MigrationSample}
    assert model.dops == (1, 2) and model.provenance == "measured"
    assert model.page_size == 16 and model.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers·K,V·heads·dim·f32
    assert all(s.seconds > 0 for s in samples)
    # The fitted file predicts its own samples: the recorded error is the one recomputed from the samples,
    # and it is sane (timings on a shared CPU are noisy, a broken fit is off by orders of magnitude).
    error = model.mean_relative_error(samples)
    assert model.metadata["fit"]["mean_relative_error"]["overall"] == pytest.approx(error)
    assert error < 0.6
    for key in ("platform", "date", "command", "machine", "model_shape", "grid", "load_average"):
        assert key in model.metadata, key
    assert model.metadata["platform"] == "cpu" and model.metadata["command"].startswith("loong-jax profile --model")
    assert model.metadata["model_shape"]["hidden"] == 64


def test_profile_on_one_instance_fits_without_migration_and_is_used(checkpoint_dir, compile_cache_dir, tmp_path,
                                                                      capsys):
    # What `loong-jax profile` does on a 1-device machine: one instance, nothing to migrate.
    from loong_jax.entrypoints.llm import LLM

    out = tmp_path / "one.json"
    code = cli_main(["profile", "--model", str(checkpoint_dir), "--instances", "1", "--quick", "--repetitions", "1",
                     "--out", str(out), "--no-progress", "--compilation-cache-dir", str(compile_cache_dir)])
    assert code == 0
    assert "no migration term" in capsys.readouterr().out
    model = CostModel.load_json(out)
    assert model.dops == (1,) and not model.has_migration
    assert "migration" not in model.metadata["fit"]["samples"]
    kwargs = dict(page_size=16, kv_pages=64, warmup=False, compilation_cache_dir=compile_cache_dir, progress=False)
    with LLM(checkpoint_dir, instances=1, cost_model=out, **kwargs) as llm:
        assert llm.cost_model.source == str(out) and llm.describe()["cost_model"] == str(out)
        (output,) = llm.generate([[5, 6, 7, 8]], {"max_tokens": 3, "ignore_eos": True}, use_tqdm=False)
        assert len(output.outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="no migration term"):  # two instances would need one
        LLM(checkpoint_dir, instances=2, cost_model=out, **kwargs)


def test_profile_command_line():
    args = profile_parser().parse_args(["--quick", "--degrees", "1,4", "--repetitions", "3", "--tp", "2"])
    assert parse_degrees(args.degrees) == [1, 4] and args.tp == 2 and args.out == "cost_model.json"
    assert grid_from_args(args) == dataclasses.replace(ProfileGrid.quick(), repetitions=3)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_degrees("1,two")
    scaled = grid_from_args(profile_parser().parse_args(["--scale", "32"]))
    assert scaled.prefill_totals == tuple(32 * n for n in ProfileGrid.full().prefill_totals)
    assert scaled.decode_batches == ProfileGrid.full().decode_batches  # batch sizes are not token counts
    with pytest.raises(argparse.ArgumentTypeError):
        grid_from_args(profile_parser().parse_args(["--scale", "0"]))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["profile", "--repetitions", "0", "--quick"])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="aligned degrees"):
        degrees_for(8, [3])
    assert degrees_for(8) == (1, 2, 4, 8) and degrees_for(6, [4, 1]) == (1, 4)


def test_grid_placements_fit_the_pools():
    assert split_evenly(10, 3) == [4, 3, 3] and sum(split_evenly(3000, 8)) == 3000
    for length, group, last in ((10, (0, 1, 2, 3), 2), (3, (4, 5, 6, 7), 0), (17, (0,), 0)):
        segments = spread_placement(length, group, last)
        assert sum(n for _, n in segments) == length and segments[-1][0] == group[last]
        assert {i for i, _ in segments} <= set(group)
    assert member_pages([64], 1, page_size=16).tolist() == [4]
    assert member_pages([64], 1, page_size=16, appends=1).tolist() == [5]  # the decode appends need a page
    # member 0: 33 tokens (master of the first prompt) + 5; member 1: 32 + 6 (master of the second)
    assert member_pages([64, 10], 2, page_size=16, appends=1).tolist() == [3 + 1, 2 + 1]
    grid = ProfileGrid.quick()
    blocks = grid_blocks(grid, (1, 2), num_instances=2, pages_per_instance=12, page_size=16)
    assert [{p.dop for p in block} for block in blocks] == [{1}, {2}, {2}]
    assert {p.kind for p in blocks[-1]} == {"migration"}
    for block in blocks[:2]:  # a block's decode KV and its largest prefill fit the pools together
        d = block[0].dop
        decode = sum(member_pages(p.lengths, d, 16, grid.repetitions + 2) for p in block if p.kind == "decode")
        prefill = max(member_pages(p.lengths, d, 16).max() for p in block if p.kind == "prefill")
        assert (decode + prefill).max() <= 12
    assert not grid_blocks(grid, (1,), num_instances=1, pages_per_instance=1, page_size=16)  # nothing fits


def demo_config() -> ModelConfig:
    return ModelConfig.from_json(DEMO_MODEL_DIR / "config.json")


def test_shipped_cpu_profile_is_measured_and_fits():
    model = CostModel.load_json(SHIPPED_CPU)
    assert model.provenance == "measured" and model.dops == (1, 2, 4, 8)
    metadata = model.metadata
    assert metadata["platform"] == "cpu" and metadata["devices"] == 8
    assert metadata["model_shape"] == model_shape(demo_config())
    for key in ("machine", "date", "command", "load_average", "grid"):
        assert metadata[key], key
    # The shipped samples reproduce the recorded fit error (the figure quoted for the CPU profile), and the
    # file was fitted to them: refitting gives the same coefficients.
    samples = read_samples(SHIPPED_DIR / "cpu_demo_samples.jsonl")
    error = model.mean_relative_error(samples)
    assert metadata["fit"]["mean_relative_error"]["overall"] == pytest.approx(error)
    refit = fit_cost_model(samples, tp=1, kv_bytes_per_token=model.kv_bytes_per_token,
                           pages_per_instance=model.pages_per_instance, page_size=model.page_size)
    assert refit.prefill == model.prefill and refit.decode == model.decode
    assert error < 0.3


def test_engine_uses_a_measured_model_only_when_it_matches():
    config = demo_config()
    chosen = engine_cost_model(config, tp=1, num_instances=8, pages=100, page_size=8, platform="cpu")
    shipped = CostModel.load_json(SHIPPED_CPU)
    assert chosen.provenance == "measured" and chosen.prefill == shipped.prefill
    assert (chosen.pages_per_instance, chosen.page_size) == (100, 8)  # the engine's own KV geometry
    assert measured_cost_model(config, tp=1, dops=(1, 2), platform="cpu") is not None
    # Another platform, another shape, another tp, or degrees the profile lacks: the roofline.
    assert engine_cost_model(config, 1, 8, 100, 8, platform="gpu").provenance == "projected"
    other = dataclasses.replace(config, intermediate_size=2 * config.intermediate_size)
    assert engine_cost_model(other, 1, 8, 100, 8, platform="cpu").provenance == "projected"
    assert measured_cost_model(config, tp=2, dops=(1,), platform="cpu") is None
    assert measured_cost_model(config, tp=1, dops=(1, 16), platform="cpu") is None
