"""A model folder is validated when it is opened: ovsd3.json, the component configs the runtime reads, every
IR's files and T5's two halves. Each damage, generated, ends in one OvsdError line naming the file and the
field, before anything compiles; `run`, `quantize` and `serve` turn it into exit 2.

The bounds below are the specification (the CLI's, from the issue), written out here rather than read from
ovsd3.layout, so that a loosened check fails these tests.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovsd3 import layout
from ovsd3.errors import OvsdError

SETTINGS = settings(max_examples=60, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
CLI_TIMEOUT = 180  # seconds: a regression that hangs or grows fails instead of wedging the suite


@pytest.fixture(scope="module")
def folder(ov_sd3, tmp_path_factory) -> Path:
    """A private copy of ov_sd3 that each example damages and :func:`restored` puts back."""
    copy = tmp_path_factory.mktemp("validation") / "model"
    shutil.copytree(ov_sd3, copy)
    return copy


def restored(folder: Path, original: Path) -> None:
    shutil.rmtree(folder)
    shutil.copytree(original, folder)


def refusal(folder: Path) -> str:
    with pytest.raises(OvsdError) as raised:
        layout.ModelFolder.open(folder)
    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# Values of the wrong kind for any field: JSON has no other kinds.
TEXTS = st.text(max_size=8)
LISTS = st.lists(st.integers(-3, 3), max_size=3)
OBJECTS = st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def bad_ints(low: int, high: int, nullable: bool = False) -> st.SearchStrategy:
    """Anything but an integer from ``low`` to ``high``: out of range, huge, fractional, NaN, other kinds."""
    wrong = [st.integers(max_value=low - 1), st.integers(min_value=high + 1), st.floats(allow_nan=True),
             st.booleans(), TEXTS, LISTS, OBJECTS, st.sampled_from([10**9, 10**30, -(10**9)])]
    return st.one_of(*wrong, *([] if nullable else [st.none()]))


def bad_numbers(low: float, high: float, *, above: bool = False) -> st.SearchStrategy:
    """Anything but a finite number within the bounds (``above``: strictly greater than ``low``)."""
    below = st.floats(max_value=low, allow_nan=False).filter(lambda value: value <= low if above else value < low)
    return st.one_of(below, st.floats(min_value=high, allow_nan=False).filter(lambda value: value > high), NOT_FINITE, st.booleans(), TEXTS,
                     LISTS, OBJECTS, st.none(), st.just(1e308 if high < 1e308 else -1e308))


def bad_int_lists(low: int, high: int) -> st.SearchStrategy:
    """Not a list of integers within the bounds: a bad element among good ones, or not a list at all."""
    good = st.integers(low, high)
    element = st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1), st.floats(), st.booleans(),
                        TEXTS, st.none())
    in_list = st.tuples(st.lists(good, max_size=2), element, st.lists(good, max_size=2)).map(
        lambda parts: [*parts[0], parts[1], *parts[2]])
    return st.one_of(in_list, st.integers(), TEXTS, OBJECTS, st.booleans(), NOT_FINITE)


# The tiny transformer has 2 blocks: a default that skips block 2 names none of them.
DEFAULTS = {
    "num_inference_steps": bad_ints(1, 1000),
    "guidance_scale": bad_numbers(0, 100),
    "sampler": st.one_of(TEXTS.filter(lambda text: text not in ("euler", "flash")), st.integers(), st.none(), LISTS),
    "skip_guidance_layers": st.one_of(bad_int_lists(0, 1), st.lists(st.integers(2, 10**9), min_size=1, max_size=3)),
}
RECORD = {
    "source": st.one_of(st.integers(), st.none(), LISTS, st.booleans()),
    "weight_format": st.one_of(st.integers(), st.none(), OBJECTS),
    "has_t5": st.one_of(st.integers(), TEXTS, st.none(), NOT_FINITE),
    "defaults": st.one_of(st.integers(), TEXTS, LISTS, st.booleans()),
    "quantization": st.one_of(st.integers(), TEXTS, LISTS),
}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))  # NaN and Infinity as Python writes them (and reads them back)


@SETTINGS
@given(field=st.sampled_from(sorted(DEFAULTS)), data=st.data())
def test_a_bad_default_is_refused_naming_the_record_and_field(folder, ov_sd3, field, data):
    value = data.draw(DEFAULTS[field], label=field)
    record = json.loads((ov_sd3 / layout.OVSD3_RECORD).read_text())
    record["defaults"][field] = value
    try:
        write_json(folder / layout.OVSD3_RECORD, record)
        message = refusal(folder)
    finally:
        restored(folder, ov_sd3)
    assert layout.OVSD3_RECORD in message and f"defaults.{field}" in message, message


@SETTINGS
@given(field=st.sampled_from(sorted(RECORD)), data=st.data(), drop=st.booleans())
def test_a_bad_or_missing_record_field_is_refused(folder, ov_sd3, field, data, drop):
    record = json.loads((ov_sd3 / layout.OVSD3_RECORD).read_text())
    required = field in ("source", "weight_format", "has_t5")
    if drop and required:
        del record[field]
    else:
        record[field] = data.draw(RECORD[field], label=field)
    try:
        write_json(folder / layout.OVSD3_RECORD, record)
        message = refusal(folder)
    finally:
        restored(folder, ov_sd3)
    assert layout.OVSD3_RECORD in message and field in message, message


TRANSFORMER = "transformer/config.json"
VAE = "vae_decoder/config.json"
SCHEDULER = "scheduler/scheduler_config.json"
CONFIG_FIELDS = {
    (TRANSFORMER, "joint_attention_dim"): bad_ints(1, 65536),
    (TRANSFORMER, "pooled_projection_dim"): bad_ints(1, 65536),
    (TRANSFORMER, "in_channels"): bad_ints(1, 1024),
    (TRANSFORMER, "patch_size"): bad_ints(1, 64),
    (TRANSFORMER, "sample_size"): bad_ints(1, 1024),
    (TRANSFORMER, "pos_embed_max_size"): bad_ints(1, 1024, nullable=True),
    (TRANSFORMER, "num_layers"): bad_ints(1, 1000),
    (TRANSFORMER, "dual_attention_layers"): bad_int_lists(0, 999),
    (VAE, "block_out_channels"): st.one_of(bad_int_lists(1, 65536), st.just([]), st.just([8] * 9)),
    (VAE, "scaling_factor"): bad_numbers(0, 1000, above=True),
    (VAE, "shift_factor"): bad_numbers(-1000, 1000),
    (SCHEDULER, "shift"): bad_numbers(0, 1000, above=True),
    (SCHEDULER, "num_train_timesteps"): bad_ints(1, 100_000),
    (SCHEDULER, "stochastic_sampling"): st.one_of(st.integers(), TEXTS, st.none(), LISTS),
}


@SETTINGS
@given(where=st.sampled_from(sorted(CONFIG_FIELDS)), data=st.data())
def test_a_bad_component_config_field_is_refused(folder, ov_sd3, where, data):
    file, field = where
    value = data.draw(CONFIG_FIELDS[where], label=field)
    config = json.loads((ov_sd3 / file).read_text())
    config[field] = value
    try:
        write_json(folder / file, config)
        message = refusal(folder)
    finally:
        restored(folder, ov_sd3)
    assert file in message and field in message, message


@pytest.mark.parametrize("file, field", [(TRANSFORMER, "joint_attention_dim"), (TRANSFORMER, "pooled_projection_dim"),
                                         (layout.OVSD3_RECORD, "has_t5")])
def test_a_missing_required_field_is_named(folder, ov_sd3, file, field):
    config = json.loads((ov_sd3 / file).read_text())
    del config[field]
    try:
        write_json(folder / file, config)
        message = refusal(folder)
    finally:
        restored(folder, ov_sd3)
    assert file in message and field in message and "missing" in message, message


IRS = [f"{name}/{layout.MODEL_XML}" for name in layout.MODEL_COMPONENTS] + \
      [f"{name}/{layout.TOKENIZER_XML}" for name in layout.TOKENIZER_OF.values()]


@SETTINGS
@given(xml=st.sampled_from(IRS), damage=st.sampled_from(["delete bin", "cut bin", "cut xml"]),
       keep=st.floats(0, 0.99))
def test_a_missing_or_truncated_ir_file_is_named(folder, ov_sd3, xml, damage, keep):
    target = folder / (xml if damage == "cut xml" else xml.replace(".xml", ".bin"))
    try:
        if damage == "delete bin":
            target.unlink()
        else:
            content = target.read_bytes()
            target.write_bytes(content[: min(int(len(content) * keep), len(content) - 16)])
        message = refusal(folder)
    finally:
        restored(folder, ov_sd3)
    assert str(target) in message, message


def test_t5_needs_both_halves(folder, ov_sd3):
    try:
        shutil.rmtree(folder / "tokenizer_3")
        message = refusal(folder)
        assert "has text_encoder_3 but no tokenizer_3" in message, message
        restored(folder, ov_sd3)
        shutil.rmtree(folder / "text_encoder_3")  # the model index (and the record) still list it
        message = refusal(folder)
        assert "text_encoder_3" in message and "missing" in message, message
        # Left out properly (both halves gone, index and record saying so), the folder opens without T5.
        shutil.rmtree(folder / "tokenizer_3")
        index = json.loads((folder / layout.MODEL_INDEX).read_text())
        write_json(folder / layout.MODEL_INDEX, {**index, "text_encoder_3": [None, None]})
        record = json.loads((folder / layout.OVSD3_RECORD).read_text())
        write_json(folder / layout.OVSD3_RECORD, {**record, "has_t5": False})
        assert not layout.ModelFolder.open(folder).has_t5
    finally:
        restored(folder, ov_sd3)


def test_good_folders_still_open(ov_sd3, ov_sd35):
    for good in (ov_sd3, ov_sd35):
        model = layout.ModelFolder.open(good)
        assert model.has_t5 and model.native_size > 0 and model.record.defaults.num_inference_steps >= 1


def test_objects_built_in_python_are_checked_too():
    from ovsd3.runtime.scheduler import FlowMatchSchedule

    for bad in (dict(num_inference_steps=10**9), dict(guidance_scale=math.nan), dict(sampler="ddim"),
                dict(skip_guidance_layers=[-1])):
        with pytest.raises(OvsdError, match=next(iter(bad))):
            layout.GenerationDefaults(**bad)
    for bad in (dict(shift=math.nan), dict(shift=0.0), dict(num_train_timesteps=0), dict(num_train_timesteps=10**12)):
        with pytest.raises(OvsdError, match=next(iter(bad))):
            FlowMatchSchedule(**bad)
    assert len(FlowMatchSchedule(shift=3.0).sigmas(4)) == 5


# --- the commands ---------------------------------------------------------------------------------------------

def damaged_copy(ov_sd3: Path, where: Path, damage) -> Path:
    shutil.copytree(ov_sd3, where)
    damage(where)
    return where


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    write_json(path, data)


def ovsd3(*argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ovsd3", *map(str, argv)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT, cwd=cwd)


def assert_one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "internal error" not in lines[0] and all(needle in lines[0] for needle in needles), lines[0]


@pytest.fixture(scope="module")
def billion_steps(ov_sd3, tmp_path_factory) -> Path:
    return damaged_copy(ov_sd3, tmp_path_factory.mktemp("billion") / "model", lambda model: edit_json(
        model / layout.OVSD3_RECORD, lambda record: record["defaults"].update(num_inference_steps=10**9)))


def test_run_quantize_and_ovms_refuse_a_folder_of_a_billion_default_steps(billion_steps, tmp_path):
    """The folder's own default, not a flag: it used to grow to 8 GB and hang."""
    for argv in (["run", billion_steps, "--prompt", "a", "--no-cache", "--output", tmp_path / "out"],
                 ["quantize", billion_steps, tmp_path / "q"],
                 ["serve", billion_steps, "--write-ovms-config", tmp_path / "ovms"]):
        assert_one_line_exit_2(ovsd3(*argv, cwd=tmp_path), "ovsd3.json", "defaults.num_inference_steps")
    assert not any(tmp_path.iterdir())  # nothing written


def test_run_refuses_a_nan_shift_and_a_missing_bin(ov_sd3, tmp_path):
    nan_shift = damaged_copy(ov_sd3, tmp_path / "nan-shift", lambda model: edit_json(
        model / SCHEDULER, lambda config: config.update(shift=math.nan)))
    no_bin = damaged_copy(ov_sd3, tmp_path / "no-bin",
                          lambda model: (model / "vae_decoder" / layout.MODEL_BIN).unlink())
    for model, needles in ((nan_shift, (SCHEDULER, "shift")), (no_bin, ("vae_decoder", layout.MODEL_BIN))):
        result = ovsd3("run", model, "--prompt", "a", "--steps", "1", "--no-cache", "--output", tmp_path / "out",
                       cwd=tmp_path)
        assert_one_line_exit_2(result, *needles)
    assert not (tmp_path / "out").exists()


def test_run_refuses_a_tokenizer_without_its_ids(ov_sd3, tmp_path):
    """A tokenizer IR whose rt_info lost its pad id compiles, then used to fail deep inside with exit 1."""
    def damage(model: Path) -> None:
        xml = model / "tokenizer" / layout.TOKENIZER_XML
        xml.write_text(xml.read_text().replace('<pad_token_id value="', '<pad_token_id value="x'))

    model = damaged_copy(ov_sd3, tmp_path / "bad-tokenizer", damage)
    result = ovsd3("run", model, "--prompt", "a", "--steps", "1", "--width", "64", "--height", "64", "--no-cache",
                   "--output", tmp_path / "out", cwd=tmp_path)
    assert_one_line_exit_2(result, "tokenizer/openvino_tokenizer.xml", "pad_token_id")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_refuses_to_start_on_a_damaged_folder(ov_sd3, tmp_path):
    """Damage that used to start the server and answer every request 500; and defaults above serve's own
    limits (a request naming no step count must not get more than one naming them may)."""
    zero_timesteps = damaged_copy(ov_sd3, tmp_path / "zero-timesteps", lambda model: edit_json(
        model / SCHEDULER, lambda config: config.update(num_train_timesteps=0)))
    many_steps = damaged_copy(ov_sd3, tmp_path / "many-steps", lambda model: edit_json(
        model / layout.OVSD3_RECORD, lambda record: record["defaults"].update(num_inference_steps=500)))
    for model, needles in ((zero_timesteps, (SCHEDULER, "num_train_timesteps")),
                           (many_steps, ("ovsd3.json", "num_inference_steps", "maximum of 100"))):
        result = ovsd3("serve", model, "--port", free_port(), cwd=tmp_path)
        assert_one_line_exit_2(result, *needles)
    result = ovsd3("serve", many_steps, "--write-ovms-config", tmp_path / "ovms", cwd=tmp_path)
    assert_one_line_exit_2(result, "num_inference_steps", "OVMS")
    assert not (tmp_path / "ovms").exists()
