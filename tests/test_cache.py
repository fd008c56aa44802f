"""Step caching: calls skipped as configured, TaylorSeer making exactly openvino.genai's calls, caching off
leaving the images as they were, and bad settings refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import main  # noqa: F401  (sys.path set by pytest for tests/)
from ovsd3.metrics import psnr
from ovsd3.runtime import SD3Pipeline
from ovsd3.runtime.cache import (CacheConfig, CacheSettingError, StepCache, TaylorFactors, TaylorSeer,
                                 taylorseer_schedule)
from ovsd3.runtime.scheduler import euler_step

PROMPT = "a photo of a cat sitting on a red sofa"
SIZE = dict(width=64, height=64)
EXIT_ERROR = 2


@pytest.fixture(scope="module")
def pipe(ov_sd3_fp32):
    return SD3Pipeline.load(ov_sd3_fp32, precision="f32", cache_dir=None)


def latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 16, 8, 8), dtype=np.float32)


def genai_calls(folder, steps: int, guidance: float, setting: TaylorSeer | None) -> int:
    """Transformer calls openvino.genai makes on ``folder``, read from its own performance metrics."""
    import openvino_genai

    genai = openvino_genai.Text2ImagePipeline(str(folder), "CPU")
    config = genai.get_generation_config()
    if setting is None:
        config.taylorseer_config = None
    else:
        config.taylorseer_config = openvino_genai.TaylorSeerCacheConfig()
        config.taylorseer_config.cache_interval = setting.cache_interval
        config.taylorseer_config.disable_cache_before_step = setting.disable_cache_before_step
        config.taylorseer_config.disable_cache_after_step = setting.disable_cache_after_step
    genai.set_generation_config(config)
    genai.generate(PROMPT, width=64, height=64, num_inference_steps=steps, guidance_scale=guidance, rng_seed=1)
    return len(genai.get_performance_metrics().raw_metrics.transformer_inference_durations)


GENAI_STORED_ORDERS = 2  # TaylorSeerState::m_max_order: the output and its first difference


def genai_schedule(setting: TaylorSeer, steps: int) -> list[bool]:
    """openvino.genai's TaylorSeerState schedule, transcribed from its source (src/cpp/src/diffusion_caching/
    taylorseer_lite.hpp: initialize() and should_compute_at_step()), as the reference for ovsd3's own."""
    after = setting.disable_cache_after_step
    after = steps + after if after < 0 else after
    if setting.disable_cache_before_step >= steps or after < 0 or after <= setting.disable_cache_before_step:
        return [True] * steps  # TaylorSeer inactive
    first = max(setting.disable_cache_before_step, GENAI_STORED_ORDERS)
    schedule = []
    for step in range(steps):
        if step < first or step >= after:
            schedule.append(True)
        else:
            offset = step - first
            schedule.append(offset >= setting.cache_interval - 1
                            and (offset - (setting.cache_interval - 1)) % setting.cache_interval == 0)
    return schedule if not all(schedule) else [True] * steps


@settings(max_examples=300, derandomize=True, deadline=None)
@given(steps=st.integers(1, 60), interval=st.integers(2, 8), before=st.integers(0, 30), after=st.integers(-40, 40))
def test_taylorseer_schedule_is_genais(steps, interval, before, after):
    setting = TaylorSeer(cache_interval=interval, disable_cache_before_step=before, disable_cache_after_step=after)
    assert taylorseer_schedule(setting, steps) == genai_schedule(setting, steps)


@pytest.mark.parametrize("steps, spec", [(28, "taylorseer"), (12, "taylorseer"), (5, "taylorseer"),
                                         (20, "taylorseer:interval=2,before=3,after=-1"),
                                         (16, "taylorseer:interval=4,before=2,after=12")])
def test_taylorseer_makes_as_many_calls_as_genai(ov_sd3, steps, spec):
    setting = CacheConfig.parse(spec).step_cache
    ours = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None)(
        PROMPT, seed=1, num_inference_steps=steps, guidance_scale=7.0, cache=spec, **SIZE).cache_stats
    theirs = genai_calls(ov_sd3, steps, 7.0, setting)
    assert ours.full_calls == theirs == sum(taylorseer_schedule(setting, steps))
    assert ours.steps == steps and ours.as_dict()["skipped_calls"] == steps - theirs
    if steps == 28 and spec == "taylorseer":
        assert theirs == 14  # genai's SD3 default: half the calls at SD3's default 28 steps


def test_caching_off_is_the_plain_sampler_bit_for_bit(pipe):
    """``cache`` off (and an all-covering guidance interval) samples exactly as before caching existed: each
    step one call of the compiled transformer on [negative, positive] and one Euler step."""
    job = pipe.prepare(PROMPT, latents=latents(), num_inference_steps=6, guidance_scale=5.0, **SIZE)
    expected = job.latents.copy()
    timesteps = pipe.schedule.timesteps(job.sigmas)
    for index, timestep in enumerate(timesteps):
        out = pipe.transformer.compiled({
            "hidden_states": np.concatenate([expected, expected]),
            "timestep": np.full((2,), timestep, dtype=np.float32),
            "encoder_hidden_states": job.embeds.prompt_embeds, "pooled_projections": job.embeds.pooled_embeds})[0]
        uncond, cond = np.split(out, 2)
        expected = euler_step(expected, uncond + np.float32(5.0) * (cond - uncond), float(job.sigmas[index]),
                              float(job.sigmas[index + 1]))
    for spec in (None, "off", "guidance-interval:low=0,high=1"):
        job = pipe.prepare(PROMPT, latents=latents(), num_inference_steps=6, guidance_scale=5.0, cache=spec, **SIZE)
        for _ in pipe.steps(job):
            pass
        np.testing.assert_array_equal(job.latents, expected)
        assert job.cache_stats.full_calls == 6 and job.cache_stats.unguided_steps == 0


def test_taylorseer_forecasts_from_the_last_full_calls():
    """Skipped steps get f(last) + f'(last) * (steps since), f' the finite difference of the last two calls,
    as genai's TaylorSeerState computes them; a velocity linear in the step is forecast exactly."""
    setting = TaylorSeer(cache_interval=3, disable_cache_before_step=2, disable_cache_after_step=-1)
    cache = StepCache(setting, 10, 1)
    computed = []

    def full_at(index):
        def full():
            computed.append(index)
            return np.full((1, 2), 3.0 + 0.5 * index, dtype=np.float32)
        return full

    got = [float(cache.velocity(index, full_at(index))[0, 0]) for index in range(10)]
    assert computed == [i for i, run in enumerate(genai_schedule(setting, 10)) if run]
    assert got == pytest.approx([3.0 + 0.5 * index for index in range(10)])
    factors = TaylorFactors(max_order=2)
    for step in (0, 2, 4):
        factors.update(step, np.array([float(step) ** 2], dtype=np.float32))
    # the TaylorSeer paper's second order: backward differences as derivatives, Taylor's 1/k! weights:
    # 16 + 6 * 2 + 2 * 2**2 / 2 (the true 36 needs the central differences caching cannot have yet)
    assert factors.predict(6)[0] == pytest.approx(32.0)


@pytest.mark.parametrize("switch_at", [3, 4, 5, 6])
def test_a_forecast_never_spans_a_guidance_switch(switch_at):
    """Where guidance starts (the batch share changes), the step runs whole although the schedule would
    forecast it, and the next forecasts extrapolate from guided outputs only."""
    setting = TaylorSeer(cache_interval=3, disable_cache_before_step=2, disable_cache_after_step=-1)
    schedule = taylorseer_schedule(setting, 10)
    cache, computed = StepCache(setting, 10, 1), []

    def full_at(index):
        def full():
            computed.append(index)  # unguided outputs far from the guided ones: a mixed forecast would show
            return np.full((1, 2), (100.0 if index >= switch_at else 0.0) + index, dtype=np.float32)
        return full

    got = [float(cache.velocity(index, full_at(index), batch_share=1.0 if index >= switch_at else 0.5)[0, 0])
           for index in range(10)]
    assert switch_at in computed
    assert computed == sorted({switch_at} | {index for index, run in enumerate(schedule) if run})
    # A forecast after the switch holds or extrapolates guided outputs (100 + step); one through the unguided
    # output before the switch would carry its jump of 100 into the slope.
    forecast_after = [index for index in range(switch_at, 10) if index not in computed]
    assert forecast_after and all(100.0 + switch_at <= got[index] <= 100.0 + index for index in forecast_after), got


def test_first_block_cache_skips_only_what_its_threshold_allows(pipe):
    settings = dict(latents=latents(), num_inference_steps=12, guidance_scale=5.0, **SIZE)
    exact = pipe(PROMPT, **settings)
    never = pipe(PROMPT, cache="first-block-cache:threshold=0.000001", **settings)
    assert never.cache_stats.full_calls == 12 and never.cache_stats.partial_calls == 0
    # the whole transformer run as two slices (first block, the rest) gives the same picture
    assert psnr(np.asarray(exact.images[0], float), np.asarray(never.images[0], float), data_range=255.0) > 45
    loose = pipe(PROMPT, cache="first-block-cache:threshold=0.99,max_skips=2,before=2,after=-1", **settings)
    stats = loose.cache_stats
    # steps 0-1 and the last always run; at most 2 skips in a row in between: 9 steps -> at least 3 full calls
    assert stats.full_calls + stats.partial_calls == 12
    assert 4 <= stats.full_calls < 12 and stats.partial_calls == 12 - stats.full_calls
    block_count = pipe.transformer.split.block_count
    assert stats.block_count == block_count
    assert stats.work == pytest.approx(stats.full_calls + stats.partial_calls / block_count)
    assert stats.work_with(24) == pytest.approx(stats.full_calls + stats.partial_calls / 24)


def test_guidance_interval_guides_only_inside_it(pipe):
    job = pipe.prepare(PROMPT, latents=latents(), num_inference_steps=10, guidance_scale=5.0,
                       cache="guidance-interval:low=0.3,high=0.9", **SIZE)
    batches = []
    pipe.transformer.observers.append(lambda inputs, out: batches.append(inputs["hidden_states"].shape[0]))
    try:
        for _ in pipe.steps(job):
            pass
    finally:
        pipe.transformer.observers.clear()
    expected = [2 if 0.3 <= sigma <= 0.9 else 1 for sigma in job.sigmas[:-1]]
    assert batches == expected and 1 in expected and 2 in expected
    assert job.cache_stats.unguided_steps == expected.count(1)
    assert job.cache_stats.work == pytest.approx(expected.count(2) + 0.5 * expected.count(1))


def test_cache_specs_parse_and_print_back():
    config = CacheConfig.parse("TaylorSeer:interval=4,order=2 + guidance-interval:low=0.1")
    assert config.step_cache == TaylorSeer(cache_interval=4, max_order=2)
    assert config.guidance_interval.low == 0.1 and config.guidance_interval.high == 1.0
    assert str(config) == "taylorseer:cache_interval=4,max_order=2+guidance-interval:low=0.1"
    assert CacheConfig.parse(str(config)) == config
    assert not CacheConfig.parse("off").active and str(CacheConfig.parse(None)) == "off"
    fast = CacheConfig.parse("Fast")  # the recommended mode, by name
    assert fast.step_cache.name == "first-block-cache" and fast.guidance_interval is not None


@pytest.mark.parametrize("spec, expected", [
    ("bogus", "unknown cache mode 'bogus' (use off, fast, taylorseer"),
    ("taylorseer:interval=-1", "cache_interval must be at least 2"),
    ("taylorseer:interval=1.5", "must be an integer"),
    ("taylorseer:before=-3", "must not be negative"),
    ("taylorseer:order=7", "max_order must be"),
    ("taylorseer:speed=9", "unknown setting 'speed=9'"),
    ("first-block-cache:threshold=0", "threshold must be between 0 and 1"),
    ("first-block-cache:threshold=1.5", "threshold must be between 0 and 1"),
    ("first-block-cache:threshold=nan", "must be a finite number"),
    ("taylorseer+first-block-cache", "choose one of"),
    ("guidance-interval:low=0.8,high=0.2", "low <= high"),
])
def test_bad_cache_settings_are_one_line_errors(spec, expected, ov_sd3, tmp_path, capsys):
    with pytest.raises(CacheSettingError, match=expected.replace("(", r"\(")):
        CacheConfig.parse(spec)
    assert issubclass(CacheSettingError, ValueError)  # what diffusers-style callers catch
    out = tmp_path / "out"
    assert main(["run", str(ov_sd3), "--prompt", "x", "--cache", spec, "--output", str(out)]) == EXIT_ERROR
    error = capsys.readouterr().err.strip()
    assert error.startswith("ovsd3 run: error: ") and expected in error and "\n" not in error
    assert not out.exists()


def test_run_reports_what_the_cache_skipped(ov_sd3, tmp_path, capsys):
    assert main(["run", str(ov_sd3), "--prompt", PROMPT, "--steps", "12", "--guidance", "5", "--width", "64",
                 "--height", "64", "--seed", "3", "--cache", "taylorseer", "--output", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "cache taylorseer: 9 of 12 steps ran the whole transformer" in err
    from PIL import Image

    with Image.open(next(tmp_path.glob("*.png"))) as image:
        assert "taylorseer" in image.text["parameters"]


def test_first_block_cache_on_a_transformer_stitched_from_slices(ov_sd3_fp32, tmp_path):
    """`ovsd3 quantize` writes big transformers stitched from slices, whose tensors keep their cut names; the
    first-block cache cuts such an IR again."""
    import os
    import shutil

    import openvino as ov

    from ovsd3 import layout
    from ovsd3.ir.slicing import extract, stages, stitch

    folder = tmp_path / "stitched"
    shutil.copytree(ov_sd3_fp32, folder, copy_function=os.link)
    xml = layout.model_xml(folder, layout.TRANSFORMER)
    model = ov.Core().read_model(xml)
    stage, _ = stages(model)
    joined = stitch([extract(model, stage, None, 1), extract(model, stage, 1, 2), extract(model, stage, 2, None)])
    for path in (xml, xml.with_suffix(".bin")):
        path.unlink()  # hard links to the fixture: replace, never write through
    ov.save_model(joined, xml, compress_to_fp16=False)
    pipe = SD3Pipeline.load(folder, precision="f32", cache_dir=None)
    settings = dict(latents=latents(), num_inference_steps=6, guidance_scale=5.0, **SIZE)
    exact = np.asarray(pipe(PROMPT, **settings).images[0], float)
    split = pipe(PROMPT, cache="first-block-cache:threshold=0.000001", **settings)
    assert split.cache_stats.full_calls == 6
    assert psnr(exact, np.asarray(split.images[0], float), data_range=255.0) > 45
