"""Cost model: relative-error fit recovers known coefficients, width floors, JSON round trip, the shipped
H200 and H100 projections and their check against published step times."""

import json

import numpy as np
import pytest

from loong_jax.scheduler.cost.fit import fit_cost_model, raised_to_floors, relative_nonnegative_least_squares
from loong_jax.scheduler.cost.model import (
    SHIPPED_DIR,
    CostModel,
    DecodeCoefficients,
    DecodeSample,
    MigrationSample,
    PrefillCoefficients,
    PrefillSample,
    load_cost_models,
    sample_from_dict,
    sample_to_dict,
    save_cost_models,
)
from loong_jax.scheduler.cost.request_cost import isolated_latency
from loong_jax.scheduler.cost.roofline import (
    H100_SXM,
    SHIPPED_FILES,
    HardwareCeilings,
    Roofline,
    TransformerShape,
    derive_cost_model,
    published_fixed_cost_check,
    roofline_samples,
)

TRUE_PREFILL = {1: PrefillCoefficients(3e-3, 2.5e-5, 6e-10), 4: PrefillCoefficients(4.5e-3, 6.5e-6, 1.5e-10)}
TRUE_DECODE = {1: DecodeCoefficients(5e-3, 1.2e-5, 1.7e-7), 4: DecodeCoefficients(5.6e-3, 1e-5, 4.4e-8)}
GEOMETRY = dict(tp=1, kv_bytes_per_token=524288, pages_per_instance=1000, page_size=16)


def synthetic_samples(noise: float, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    samples = []
    for dop in TRUE_PREFILL:
        for _ in range(120):
            # Log-uniform sizes, as a profiling grid has: every coefficient dominates somewhere.
            lengths = tuple(int(x) for x in np.exp(rng.uniform(np.log(4), np.log(60_000), size=rng.integers(1, 6))))
            exact = TRUE_PREFILL[dop].time(sum(lengths), sum(x * x for x in lengths))
            samples.append(PrefillSample(dop, lengths, exact * (1 + noise * rng.standard_normal())))
        for _ in range(120):
            batch = int(np.exp(rng.uniform(0, np.log(512))))
            context = int(batch * np.exp(rng.uniform(0, np.log(50_000))))
            exact = TRUE_DECODE[dop].time(batch, context)
            samples.append(DecodeSample(dop, batch, context, exact * (1 + noise * rng.standard_normal())))
    for num_bytes in np.geomspace(1e6, 1e11, 20):
        samples.append(MigrationSample(int(num_bytes), (2e-5 + 3e-12 * num_bytes) * (1 + noise * rng.standard_normal())))
    return samples


def assert_close(fitted, true, rtol):
    for name in fitted.__dataclass_fields__:
        assert getattr(fitted, name) == pytest.approx(getattr(true, name), rel=rtol), name


def test_fit_recovers_exact_coefficients_without_noise():
    model = fit_cost_model(synthetic_samples(noise=0.0), **GEOMETRY)
    for dop in TRUE_PREFILL:
        assert_close(model.prefill[dop], TRUE_PREFILL[dop], 1e-6)
        assert_close(model.decode[dop], TRUE_DECODE[dop], 1e-6)
    assert model.migration_seconds_per_byte == pytest.approx(3e-12, rel=1e-6)
    assert model.migration_latency_s == pytest.approx(2e-5, rel=1e-6)


def test_fit_recovers_coefficients_under_relative_noise():
    samples = synthetic_samples(noise=0.03, seed=1)
    model = fit_cost_model(samples, **GEOMETRY)
    for dop in TRUE_PREFILL:
        assert_close(model.prefill[dop], TRUE_PREFILL[dop], 0.08)
        assert_close(model.decode[dop], TRUE_DECODE[dop], 0.08)
    # 3% Gaussian relative noise: the mean |error| of a good fit is close to 0.03·sqrt(2/π) ≈ 0.024.
    assert model.mean_relative_error(samples) < 0.03


def test_relative_weighting_beats_plain_least_squares_on_relative_error():
    rng = np.random.default_rng(2)
    lengths = np.geomspace(10, 100_000, 60)
    features = np.stack([np.ones_like(lengths), lengths, lengths**2], axis=1)
    measured = (features @ np.array([3e-3, 2.5e-5, 6e-10])) * (1 + 0.05 * rng.standard_normal(len(lengths)))
    weighted = relative_nonnegative_least_squares(features, measured)
    plain, *_ = np.linalg.lstsq(features, measured, rcond=None)

    def mean_relative(theta):
        return np.mean(np.abs(features @ theta - measured) / measured)

    assert mean_relative(weighted) < 0.8 * mean_relative(plain)


def test_fit_keeps_coefficients_non_negative():
    # Pure linear data with noise: an unconstrained fit gives a small negative constant or quadratic term.
    rng = np.random.default_rng(3)
    samples = []
    for _ in range(40):
        length = int(rng.integers(100, 10_000))
        samples.append(PrefillSample(1, (length,), 1e-5 * length * (1 + 0.05 * rng.standard_normal())))
        batch = int(rng.integers(1, 64))
        samples.append(DecodeSample(1, batch, batch * 100, 1e-4 * batch * (1 + 0.05 * rng.standard_normal())))
    model = fit_cost_model(samples, migration_seconds_per_byte=1e-12, **GEOMETRY)
    for coefficients in (model.prefill[1], model.decode[1]):
        assert all(value >= 0 for value in coefficients.__dict__.values())


def test_fit_needs_enough_rows_and_positive_times():
    with pytest.raises(ValueError, match="need at least"):
        fit_cost_model([PrefillSample(1, (10,), 1.0)], migration_seconds_per_byte=1e-12, **GEOMETRY)
    with pytest.raises(ValueError, match="positive"):
        relative_nonnegative_least_squares(np.ones((3, 2)), np.array([1.0, 0.0, 1.0]))


def test_queries():
    model = fit_cost_model(synthetic_samples(noise=0.0), **GEOMETRY)
    assert model.dops == (1, 4)
    lengths = [100, 2000, 30_000]
    assert model.prefill_time(4, lengths) == pytest.approx(
        model.prefill_time_from_sums(4, sum(lengths), sum(x * x for x in lengths))
    )
    assert model.migration_time(0) == 0.0
    assert model.migration_time(1000) == pytest.approx(2e-5 + 3e-12 * 1000 * 524288, rel=1e-6)
    with pytest.raises(ValueError, match="no prefill entry for DoP 2"):
        model.prefill_time(2, [10])
    with pytest.raises(ValueError, match="no decode entry for DoP 8"):
        model.decode_time(8, 1, 10)


def test_one_instance_profile_fits_without_a_migration_term(tmp_path):
    # One instance has nothing to migrate: no migration samples, and the model says it has no such term.
    samples = [s for s in synthetic_samples(noise=0.0) if not isinstance(s, MigrationSample)]
    model = fit_cost_model(samples, **GEOMETRY)
    assert not model.has_migration and model.migration_seconds_per_byte is None
    assert model.prefill_time(1, [100]) > 0 and model.migration_time(0) == 0.0
    model.check_instances(1)
    path = tmp_path / "one_instance.json"
    model.save_json(path)
    assert json.loads(path.read_text())["sections"][0]["migration_seconds_per_byte"] is None
    loaded = CostModel.load_json(path)
    assert loaded == model and not loaded.has_migration and loaded.source == str(path)
    with pytest.raises(ValueError, match=r"no migration term .* cannot serve 2 instances"):
        loaded.check_instances(2)
    with pytest.raises(ValueError, match="cannot price a migration"):
        loaded.migration_time(16)
    assert fit_cost_model(synthetic_samples(noise=0.0), **GEOMETRY).has_migration


def test_json_round_trip_with_several_tp_sections(tmp_path):
    model = fit_cost_model(synthetic_samples(noise=0.01), description="synthetic", metadata={"k": 1}, **GEOMETRY)
    other = CostModel(**{**model.__dict__, "tp": 2, "pages_per_instance": 2500})
    path = tmp_path / "cm.json"
    save_cost_models(path, [model, other], name="synthetic")
    assert CostModel.load_json(path, tp=1) == model
    assert CostModel.load_json(path, tp=2) == other
    assert CostModel.load_json(path, tp=1).metadata == {"k": 1}
    assert CostModel.load_json(path) == model  # several sections: tp=1 by default
    save_cost_models(path, [other])
    assert CostModel.load_json(path) == other  # one section: that one
    save_cost_models(path, [other, CostModel(**{**other.__dict__, "tp": 4})])
    with pytest.raises(ValueError, match="pass tp="):
        CostModel.load_json(path)
    save_cost_models(path, [model, other])
    with pytest.raises(ValueError, match="no section for tp=4"):
        CostModel.load_json(path, tp=4)
    single = tmp_path / "single.json"
    model.save_json(single)
    assert CostModel.load_json(single) == model
    document = json.loads(single.read_text())
    document["schema_version"] = 99
    single.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="schema_version 99"):
        load_cost_models(single)


def test_sample_dict_round_trip():
    for sample in synthetic_samples(noise=0.0)[::50]:
        assert sample_from_dict(json.loads(json.dumps(sample_to_dict(sample)))) == sample
    with pytest.raises(ValueError, match="unknown profile sample kind"):
        sample_from_dict({"kind": "train"})


def test_isolated_latency_matches_step_by_step_sum():
    model = fit_cost_model(synthetic_samples(noise=0.0), **GEOMETRY)
    input_len, output_len = 5000, 40
    best = float("inf")
    for prefill_dop in model.dops:
        for decode_dop in model.dops:
            total = model.prefill_time(prefill_dop, [input_len])
            total += sum(model.decode_time(decode_dop, 1, input_len + k) for k in range(1, output_len))
            best = min(best, total)
    assert isolated_latency(model, input_len, output_len, max_dop=8) == pytest.approx(best, rel=1e-9)
    assert isolated_latency(model, input_len, 1, max_dop=1) == pytest.approx(model.prefill_time(1, [input_len]))


@pytest.mark.parametrize("hardware, file_name", SHIPPED_FILES)
def test_shipped_files_are_the_roofline_projection(hardware, file_name):
    shipped = load_cost_models(SHIPPED_DIR / file_name)
    assert sorted(shipped) == [1, 2, 4, 8]
    regenerated = derive_cost_model(hardware=hardware, tp=1)
    model = shipped[1]
    assert model.provenance == "projected"
    assert model.dops == tuple(range(1, 65))  # a group may span a 64-instance cluster
    assert model.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2
    for dop in model.dops:
        assert_close(model.prefill[dop], regenerated.prefill[dop], 1e-9)
        assert_close(model.decode[dop], regenerated.decode[dop], 1e-9)
    assert model.pages_per_instance == regenerated.pages_per_instance
    # The fit stays close to the roofline it summarises.
    roofline = Roofline(TransformerShape(), hardware, tp=1)
    assert model.mean_relative_error(roofline_samples(roofline, 8, seed=8)) < 0.08


@pytest.mark.parametrize("file_name", [name for _, name in SHIPPED_FILES])
def test_shipped_groups_are_never_faster_than_their_members(file_name):
    # Efficiency = T_1·1 / (T_d·d) ≤ 1 for every shipped tp, degree and prompt length (the unconstrained fit
    # gave 1.04 at d = 8 and 1.13 at d = 16 for 128K-256K tokens), and the same for decode steps.
    for model in load_cost_models(SHIPPED_DIR / file_name).values():
        for dop in model.dops:
            for length in (16, 100, 1_000, 8_000, 32_000, 128_000, 256_000, 512_000):
                assert model.prefill_efficiency(dop, [length]) <= 1 + 1e-12, (model.tp, dop, length)
            assert model.prefill_efficiency(dop, [3_000] * 16) <= 1 + 1e-12
            for batch, context in ((1, 100), (8, 800_000), (256, 256 * 2_000)):
                assert dop * model.decode_time(dop, batch, context) >= model.decode_time(1, batch, context) * (1 - 1e-12)


def test_fit_floors_each_degree_by_the_one_below():
    # A profile where d = 4 measures superlinearly fast (4.4x at long prompts): the fit may not keep that.
    rows = []
    for length in np.geomspace(100, 200_000, 30).astype(int):
        rows.append(PrefillSample(1, (int(length),), TRUE_PREFILL[1].time(length, length * length)))
        rows.append(PrefillSample(4, (int(length),), TRUE_PREFILL[1].time(length, length * length) / 4.4))
    unconstrained = [relative_nonnegative_least_squares(
        np.array([[1.0, s.lengths[0], s.lengths[0] ** 2] for s in rows if s.dop == dop]),
        [s.seconds for s in rows if s.dop == dop]) for dop in (1, 4)]
    assert 4 * unconstrained[1][2] < unconstrained[0][2]  # the raw fit is superlinear
    model = fit_cost_model(rows, migration_seconds_per_byte=1e-12, **GEOMETRY)
    for length in (100, 10_000, 200_000):
        assert model.prefill_efficiency(4, [length]) <= 1 + 1e-12
    coefficients = [np.array(list(vars(model.prefill[d]).values())) for d in (1, 4)]
    assert np.all(4 * coefficients[1] >= coefficients[0] * (1 - 1e-12))
    with pytest.raises(ValueError, match="lower_bounds"):
        relative_nonnegative_least_squares(np.ones((3, 2)), np.ones(3), np.array([-1.0, 0.0]))


def test_coefficients_from_two_sources_are_raised_to_the_floors():
    # A measured d = 1 three times slower than the projection d = 2 was derived beside: the projected pair
    # would do in 2·T_2 < T_1 what one instance needs, until raised.
    slow_one = PrefillCoefficients(3e-3, 3e-6, 3e-11)
    projected_two, projected_four = PrefillCoefficients(1e-3, 1e-6, 1e-11), PrefillCoefficients(9e-4, 1e-6, 1e-12)
    raised = raised_to_floors({1: slow_one, 2: projected_two, 4: projected_four})
    assert raised[1] == slow_one
    assert raised[2] == PrefillCoefficients(1.5e-3, 1.5e-6, 1.5e-11)
    assert raised[4] == PrefillCoefficients(9e-4, 1e-6, 7.5e-12)  # each coefficient by the one below it


def test_roofline_numbers():
    shape, hardware = TransformerShape(), HardwareCeilings()
    assert shape.total_params == 6_738_415_616  # Llama-2-7B
    assert (hardware.matmul_flops, hardware.hbm_bandwidth, hardware.hbm_bytes) == (989e12, 4.8e12, 141e9)  # H200 SXM
    assert (H100_SXM.matmul_flops, H100_SXM.hbm_bandwidth, H100_SXM.hbm_bytes) == (989e12, 3.35e12, 80e9)
    roofline = Roofline(shape, hardware, tp=1)
    # Decode of one short request: stream the 13.5 GB of weights and 100 tokens of KV at 70% of 4.8 TB/s.
    expected = 0.5e-3 + (shape.weight_bytes + 100 * 524288) / (0.7 * 4.8e12)
    assert roofline.decode_seconds(1, 1, 100) == pytest.approx(expected, rel=1e-9)
    # KV capacity: 90% of 141 GB minus weights, 512 KiB per token.
    assert roofline.kv_capacity_tokens() == int((141e9 * 0.9 - shape.weight_bytes) // 524288)
    # A long prompt gets faster with more instances, a tiny one does not.
    assert roofline.prefill_seconds(8, [100_000]) < roofline.prefill_seconds(4, [100_000]) / 1.8
    assert roofline.prefill_seconds(8, [64]) > roofline.prefill_seconds(1, [64])


def test_fixed_costs_match_loongserve_published_step_times():
    # The roofline on LoongServe's A800s at tp 2, d 4 reproduces its 32.8 ms prefill of 100 tokens and its
    # 12.4 ms decode step (the old 10 us collective latency gave 6.9 and 5.9 ms: too optimistic).
    check = published_fixed_cost_check()
    assert check["prefill_100_tokens_model_s"] == pytest.approx(check["prefill_100_tokens_published_s"], rel=0.02)
    assert check["decode_step_model_s"] == pytest.approx(check["decode_step_published_s"], rel=0.02)
