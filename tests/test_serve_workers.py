"""`ovsd3 serve --workers N`: one pipeline and N-1 clones sharing its compiled models (SD3Pipeline.clone)."""

from __future__ import annotations

import base64
import io
import math
import os
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from ovsd3.errors import InvalidRequest, OvsdError
from ovsd3.runtime import SD3Pipeline
from ovsd3.serve.launch import serving

CALL = dict(num_inference_steps=3, width=64, height=64, output_type="np")
# Each exercises other compiled models: the whole transformer; its first-block and rest slices (compiled when
# first asked for, by whichever pipeline asks); its skip-layer variant; the VAE encoder (image-to-image).
SETTINGS = {
    "plain": {},
    "first-block-cache": {"cache": "fast", "num_inference_steps": 6},
    "skip-layer-guidance": {"skip_guidance_layers": [1], "skip_layer_guidance_stop": 0.9},
    "image-to-image": {"image": np.full((64, 64, 3), 0.4, dtype=np.float32), "strength": 0.7},
}


@pytest.fixture(scope="module")
def pipe(ov_sd3):
    return SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None, concurrency=2)


@pytest.mark.parametrize("name", SETTINGS)
def test_a_clone_draws_exactly_what_its_source_draws(pipe, name):
    call = dict(CALL, **SETTINGS[name])
    twin = pipe.clone()
    drawn = twin("a red sofa", seed=11, **call).images  # the clone first: it compiles the lazy variants
    assert np.array_equal(drawn, pipe("a red sofa", seed=11, **call).images)
    assert not np.array_equal(drawn, pipe("a red sofa", seed=12, **call).images)  # the seed matters here


def draw_in_lockstep(pipelines, prompts, seeds, call):
    """Each pipeline draws in its own thread, every step waiting for the others: all run at once."""
    barrier = threading.Barrier(len(pipelines), timeout=120)
    drawn, failures = {}, []

    def draw(index):
        try:
            drawn[index] = pipelines[index](prompts[index], seed=seeds[index], callback=lambda step: barrier.wait(),
                                            **call).images
        except BaseException as error:  # the main thread reports it
            failures.append(error)
            barrier.abort()

    threads = [threading.Thread(target=draw, args=(index,)) for index in range(len(pipelines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    return [drawn[index] for index in range(len(pipelines))]


@pytest.mark.parametrize("name", ["plain", "first-block-cache"])
def test_clones_drawing_at_once_each_draw_what_they_draw_alone(pipe, name):
    call = dict(CALL, **SETTINGS[name])
    twins = [pipe.clone(), pipe.clone()]
    prompts, seeds = ["a cat on the moon", "a bowl of fruit"], [1, 2]
    alone = [twin(prompt, seed=seed, **call).images for twin, prompt, seed in zip(twins, prompts, seeds)]
    together = draw_in_lockstep(twins, prompts, seeds, call)
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))
    assert not np.array_equal(alone[0], alone[1])


def compiled_models(pipeline):
    text = pipeline.text
    return {"transformer": pipeline.transformer.compiled, "vae_decoder": pipeline.vae_decoder.get(),
            "vae_encoder": pipeline.vae_encoder.get(),
            **{f"clip_{index}": encoder.get() for index, encoder in enumerate(text.clip_encoders)},
            **{f"tokenizer_{index}": tokenizer.compiled for index, tokenizer in enumerate(text.clip_tokenizers)},
            "t5": text.t5_encoder.get(), "t5_tokenizer": text.t5_tokenizer.compiled}


def test_clones_share_the_compiled_models_and_not_the_infer_requests(pipe):
    twin = pipe.clone()
    twin("a cat", seed=1, **dict(CALL, cache="fast"))  # the clone compiles the first-block slices
    ours, theirs = compiled_models(pipe), compiled_models(twin)
    assert all(ours[name] is theirs[name] for name in ours)
    assert pipe.transformer.split is twin.transformer.split  # compiled by the clone, seen by the source
    for name in ours:
        assert pipe._requests.request_of(ours[name]) is not twin._requests.request_of(theirs[name]), name
    assert pipe.transformer.observers is not twin.transformer.observers
    assert pipe.infer_seconds is not twin.infer_seconds


def test_concurrency_splits_the_cores_into_streams(ov_sd3, pipe):
    alone = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None)
    assert alone.transformer.compiled.get_property("NUM_STREAMS") == 1
    pipe("a cat", seed=1, **CALL)  # compiled at its first call, for its shapes
    streams = pipe.transformer.compiled.get_property("NUM_STREAMS")
    assert streams == min(2, os.cpu_count())  # each stream with cores / streams threads


def test_concurrent_pipelines_compile_the_transformer_per_call_shape(ov_sd3):
    """Compiled for several calls at once, the transformer is compiled for each call's shapes (with dynamic
    shapes every CPU stream builds its own memory), the last few kept and shared with the clones: a size seen
    again does not compile again; a lone pipeline keeps dynamic shapes."""
    from ovsd3.runtime.devices import ShapeSpecialised
    from ovsd3.runtime.pipeline import SHAPES_KEPT

    serving = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None, concurrency=2)
    twin = serving.clone()
    specialised = serving.transformer.compiled
    assert isinstance(specialised, ShapeSpecialised) and twin.transformer.compiled is specialised
    assert not isinstance(SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None).transformer.compiled,
                          ShapeSpecialised)
    serving("a cat", seed=1, **CALL)
    first = specialised._compiled
    twin("a cat", seed=1, **dict(CALL, width=128))
    assert specialised._compiled is not first and len(specialised._by_shapes) == 2
    serving("a cat", seed=2, **CALL)
    assert specialised._compiled is first  # the 64x64 compilation, kept
    for width in (96, 112, 128, 144):
        twin("a cat", seed=1, **dict(CALL, width=width))
    assert len(specialised._by_shapes) == SHAPES_KEPT


def test_what_would_change_shared_models_is_refused(ov_sd3, pipe):
    lonely = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None)
    twin = lonely.clone()
    for pipeline in (lonely, twin):
        with pytest.raises(OvsdError, match=r"set_adapters\(\) would change the compiled models"):
            pipeline.set_adapters([])
        with pytest.raises(OvsdError, match=r"enable_model_cpu_offload\(\) would change"):
            pipeline.enable_model_cpu_offload()
    assert lonely.transformer.compiled is twin.transformer.compiled and not lonely.offload
    offloading = SD3Pipeline.load(ov_sd3, device="CPU", cache_dir=None, offload=True)
    with pytest.raises(OvsdError, match="with model offload nothing stays compiled"):
        offloading.clone()


@pytest.mark.parametrize("concurrency", [0, -1, 65, 10**9, True, 2.5, math.nan, "2", None])
def test_concurrency_out_of_bounds_is_refused_before_compiling(ov_sd3, monkeypatch, concurrency):
    def refuse(*args, **kwargs):
        raise AssertionError("compiling started before the refusal")

    monkeypatch.setattr("ovsd3.runtime.pipeline.ModelCompiler", refuse)
    with pytest.raises(InvalidRequest, match="concurrency must be a whole number from 1 to 64"):
        SD3Pipeline.load(ov_sd3, device="CPU", concurrency=concurrency)


class Counted:
    """A stand-in pipeline that counts loads and clones."""

    def __init__(self, counts, offload=False):
        self.counts, self.offload = counts, offload
        counts["load"] += 1

    def clone(self):
        self.counts["clone"] += 1
        return self


@pytest.mark.parametrize("offload, expected", [(False, {"load": 1, "clone": 2}), (True, {"load": 3, "clone": 0})])
def test_the_pool_loads_once_and_clones(offload, expected):
    from ovsd3.serve.jobs import WorkerPool

    counts = {"load": 0, "clone": 0}
    pool = WorkerPool(lambda: Counted(counts, offload), workers=3, max_queue=4)
    pool.close()
    assert counts == expected  # model offload compiles per call: nothing to share, each worker loads


def served_pixels(base: str, seed: int) -> np.ndarray:
    body = {"prompt": "a lighthouse in a storm", "num_inference_steps": 3, "size": "64x64", "n": 2, "seed": seed}
    answer = httpx.post(f"{base}/v3/images/generations", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))
                     for item in answer.json()["data"]]).astype(int)


def test_two_workers_draw_what_one_draws(ov_sd3):
    """Within one pool every worker draws the same bits (above). Across pools of other sizes each call runs
    on cores / workers threads, which sums in another order: float differences of about 1e-6, so equal PNGs
    but for a rare rounding of one level."""
    with serving(ov_sd3, "--device", "CPU", "--workers", "1") as base:
        one = served_pixels(base, seed=5)
    with serving(ov_sd3, "--device", "CPU", "--workers", "2") as base:
        two = served_pixels(base, seed=5)
        other_seed = served_pixels(base, seed=6)
    assert np.abs(one - two).max() <= 1 and np.mean(one == two) > 0.999
    assert np.abs(one - other_seed).max() > 16  # a picture that differs is seen to


def test_job_timeout_ends_a_running_job_with_an_error(ov_sd3):
    """`ovsd3 serve --job-timeout`: the embedded pool's jobs end with an error past their time, never silently
    (the same runner as `ovsd3 worker`'s, tested there through a broker)."""
    from ovsd3.serve.jobs import GenerationRequest, WorkerPool, load_pipeline

    pool = WorkerPool(load_pipeline(ov_sd3, "CPU"), 1, 4, job_timeout=1e-6)
    try:
        job = pool.submit(GenerationRequest(prompt="a cat", width=64, height=64, num_inference_steps=5))
        assert job.wait(120)
        assert job.status == "error" and "time limit" in job.error and not job.caller_error
        assert sum(event["event"] == "step" for event in job.events) == 0  # stopped at its first step's end
        assert pool.metrics.failed == 1
    finally:
        pool.close()
