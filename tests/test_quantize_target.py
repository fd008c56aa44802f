"""`ovsd3 quantize --target-cpu`: per ISA level the table's formats, the choice recorded in ovsd3.json and shown
by reports, the CPU plugin options a record asks for applied when compiling, and bad values refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openvino as ov
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ovsd3 import layout
from ovsd3.cli import EXIT_ERROR, main
from ovsd3.errors import OvsdError
from ovsd3.quantize import target
from ovsd3.report.compare import cpu_target_line
from ovsd3.runtime.devices import CompileOptions, DevicePlan, ModelCompiler

from helpers import attention_inputs_quantized, attention_quantized, quantize


def fake_quantize_count(folder: Path) -> int:
    model = ov.Core().read_model(layout.model_xml(folder, layout.TRANSFORMER))
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


@pytest.mark.parametrize("flags, level", [
    ({"avx2", "fma"}, "avx2"), ({"avx2", "avx512f", "avx512bw"}, "avx512"), ({"avx512f"}, "avx2"),
    ({"avx2", "avx_vnni"}, "vnni"), ({"avx512f", "avx512bw", "avx512_vnni"}, "vnni"),
    ({"avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}, "amx")])
def test_isa_level_from_cpu_flags(flags, level):
    assert target.isa_of_flags(flags) == level


@pytest.mark.parametrize("level, transformer", [("avx2", "int8-fc"), ("avx512", "int8-fc"), ("vnni", "int8"),
                                                ("amx", "int8")])
def test_a_named_level_picks_the_tables_choice(level, transformer):
    choice = target.choose(level)
    assert (choice["isa"], choice["transformer"], choice["vae_decoder"]) == (level, transformer, "int8")
    assert choice["why"] and choice["target"] == level and "measured" not in choice


@pytest.mark.parametrize("attention, convolution, transformer, decoder", [
    (0.78, 1.7, "int8-fc", "int8"), (1.4, 1.9, "int8", "int8"), (1.04, 1.6, "int8-fc", "int8"),
    (1.1, 0.8, "int8", "weights")])
def test_this_cpu_picks_what_measures_faster(attention, convolution, transformer, decoder):
    speedups = {"fully_connected": 1.2, "attention": attention, "convolution": convolution}
    choice = target.choose("this", isa="avx2", speedups=speedups)
    assert (choice["transformer"], choice["vae_decoder"]) == (transformer, decoder)
    assert choice["measured"] == speedups and f"quantized too {attention:.2f}x" in choice["why"]
    assert f"convolution {convolution:.2f}x float" in choice["why"]


def test_probe_times_one_block_of_the_folders_transformer_in_each_form(ov_sd3):
    """The probe's candidates are the folder's own transformer cut to one block (the other blocks' weights gone),
    in float, INT8 with the attention in float, and all INT8, as quantize writes them; its decoder candidates one
    convolution in fp16 and in NNCF's INT8 pattern."""
    import numpy as np

    from ovsd3.quantize import probe

    whole = ov.Core().read_model(layout.model_xml(ov_sd3, layout.TRANSFORMER))
    forms, inputs = probe.block_forms(ov_sd3, 64)
    assert set(forms) == {"float", "int8-fc", "int8"} and inputs["hidden_states"].shape == (1, 16, 8, 8)
    names = {op.get_friendly_name() for op in forms["float"].get_ops()}
    assert any(".transformer_blocks.0." in name for name in names)
    assert not any(f".transformer_blocks.1.{part}" in name for name in names for part in ("attn", "ff"))
    assert len(forms["float"].get_ops()) < len(whole.get_ops())
    for form, quantized_attention in (("int8-fc", False), ("int8", True)):
        count = sum(op.get_type_name() == "FakeQuantize" for op in forms[form].get_ops())
        assert count > 3 and attention_quantized(forms[form]) == quantized_attention, form
    assert "FakeQuantize" not in {op.get_type_name() for op in forms["float"].get_ops()}
    rng = np.random.default_rng(0)
    assert "FakeQuantize" in {op.get_type_name() for op in probe.convolution_model(True, rng).get_ops()}
    assert "f16" in {op.get_output_element_type(0).get_type_name()
                     for op in probe.convolution_model(False, rng).get_ops() if op.get_type_name() == "Constant"}


def test_probe_is_measured_once_per_cpu_and_architecture(monkeypatch, tmp_path, ov_sd3, ov_sd35):
    from ovsd3.quantize import probe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(probe, "measure", lambda folder, size: calls.append(size) or
                        {key: 1.5 for key in probe.KEYS})
    expected = {key: 1.5 for key in probe.KEYS}
    assert probe.speedups(ov_sd3, 64, "cpu A", {"avx2"}) == expected
    assert probe.speedups(ov_sd3, 64, "cpu A", {"avx2"}) == expected and len(calls) == 1
    probe.speedups(ov_sd3, 64, "cpu B", {"avx2"})
    probe.speedups(ov_sd3, 128, "cpu A", {"avx2"})
    probe.speedups(ov_sd35, 64, "cpu A", {"avx2"})
    assert len(calls) == 4  # another CPU, size or architecture measures for itself
    for path in (tmp_path / "ovsd3" / "cpu-probe").iterdir():
        path.write_text("{not json")
    probe.speedups(ov_sd3, 64, "cpu A", {"avx2"})
    assert len(calls) == 5  # a damaged file is measured again, not an error


def test_this_cpu_is_detected(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    assert target.cpu_flags(cpuinfo) == {"fpu", "sse", "avx2", "fma"}
    assert target.cpu_flags(tmp_path / "missing") is None
    monkeypatch.setattr(target, "cpu_flags", lambda: {"avx512f", "avx512bw", "avx512_vnni"})
    assert target.choose("this")["isa"] == "vnni"


@pytest.fixture(scope="module")
def q_avx2(workdir, ov_sd3) -> Path:
    out = workdir / "q-avx2"
    assert quantize(ov_sd3, out, "--target-cpu", "avx2") == 0
    return out


def test_avx2_keeps_the_attention_fused_in_float_and_records_why(q_avx2, q_sd3):
    record = layout.FolderRecord.load(q_avx2)
    assert record.cpu_target["target"] == "avx2" and record.cpu_target["transformer"] == "int8-fc"
    assert "VNNI" in record.cpu_target["why"]
    assert record.quantization["transformer"]["ignore_types"] == ["ScaledDotProductAttention"]
    assert not attention_inputs_quantized(q_avx2)
    assert fake_quantize_count(q_avx2) > 10  # the fully connected layers are still INT8


def test_vnni_quantizes_the_attention_too(ov_sd3, tmp_path):
    out = tmp_path / "q-vnni"
    assert quantize(ov_sd3, out, "--target-cpu", "vnni") == 0
    record = layout.FolderRecord.load(out)
    assert (record.cpu_target["isa"], record.cpu_target["transformer"]) == ("vnni", "int8")
    assert attention_inputs_quantized(out)


def test_the_default_target_is_this_cpu(q_sd3):
    record = layout.FolderRecord.load(q_sd3)  # the session's folder, quantized without --target-cpu
    assert record.cpu_target["target"] == "this"
    assert record.cpu_target["isa"] == target.detect_isa()
    measured = record.cpu_target["measured"]
    assert set(measured) == {"fully_connected", "attention", "convolution"}
    assert all(0.1 < value < 10 for value in measured.values())
    quantized_attention = measured["attention"] >= target.ATTENTION_MARGIN
    assert attention_inputs_quantized(q_sd3) == quantized_attention
    assert record.cpu_target["transformer"] == ("int8" if quantized_attention else "int8-fc")
    assert record.cpu_target["vae_decoder"] == ("int8" if measured["convolution"] >= 1.0 else "weights")


def test_an_explicit_format_overrides_the_table_and_says_so(ov_sd3, tmp_path):
    out = tmp_path / "w8"
    assert quantize(ov_sd3, out, "--target-cpu", "avx2", "--transformer-weights", "int8",
                    "--vae-decoder", "weights") == 0
    record = layout.FolderRecord.load(out)
    assert record.cpu_target["transformer"] == "int8-weights" and record.cpu_target["vae_decoder"] == "weights"
    assert "--transformer-weights given" in record.cpu_target["why"]
    assert "--vae-decoder given" in record.cpu_target["why"]


def test_report_shows_the_choice_and_why(q_avx2):
    record = layout.FolderRecord.load(q_avx2)
    line = cpu_target_line({"label": "INT8", "cpu_target": record.cpu_target})
    assert "INT8: quantized for avx2 (--target-cpu): transformer int8-fc, VAE decoder int8; why: no VNNI" in line


def with_record(folder: Path, tmp_path: Path, cpu_target) -> Path:
    copy = Path(shutil.copytree(folder, tmp_path / "model"))
    path = copy / layout.OVSD3_RECORD
    data = json.loads(path.read_text())
    data["cpu_target"] = cpu_target
    path.write_text(json.dumps(data))
    return copy


RUNTIME = {"target": "avx2", "isa": "avx2", "transformer": "int8-fc", "vae_decoder": "int8",
           "runtime": {"transformer": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}}}


@pytest.mark.parametrize("device", ["CPU", "AUTO"])
def test_runtime_applies_the_recorded_cpu_options(q_avx2, tmp_path, device):
    folder = with_record(q_avx2, tmp_path, RUNTIME)
    compiler = ModelCompiler(folder, CompileOptions(plan=DevicePlan(default=device), cache_dir=None))
    transformer = compiler.compile(layout.TRANSFORMER).compiled
    decoder = compiler.compile(layout.VAE_DECODER).compiled
    if device == "CPU":
        assert int(transformer.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == 0
        assert int(decoder.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) != 0  # only where the record says
    else:
        assert compiler._config("AUTO", layout.TRANSFORMER)["DEVICE_PROPERTIES"] == \
            {"CPU": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}}
        assert "DEVICE_PROPERTIES" not in compiler._config("AUTO", layout.VAE_DECODER)


def test_a_folder_without_a_cpu_target_compiles_as_before(ov_sd3):
    compiler = ModelCompiler(ov_sd3, CompileOptions(plan=DevicePlan(default="CPU"), cache_dir=None))
    assert compiler._config("CPU", layout.TRANSFORMER) == {"PERFORMANCE_HINT": "LATENCY"}


def test_bad_target_cpu_exits_2_in_one_line(ov_sd3, tmp_path, capsys):
    try:
        code = main(["quantize", str(ov_sd3), str(tmp_path / "out"), "--target-cpu", "sse4"])
    except SystemExit as stop:  # argparse's own refusal of a choice not offered: usage, then one error line
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == EXIT_ERROR and "Traceback" not in err
    assert err.splitlines()[-1].startswith("ovsd3 quantize: error: argument --target-cpu: invalid choice: 'sse4'")
    assert not (tmp_path / "out").exists()
    with pytest.raises(OvsdError, match="--target-cpu must be one of"):
        target.choose("avx3")


BAD_RECORDS = [
    ({**RUNTIME, "isa": "sse4"}, "cpu_target.isa"),
    ({**RUNTIME, "runtime": {"transformer": {"NUM_STREAMS": 4}}}, "NUM_STREAMS"),
    ({**RUNTIME, "runtime": {"unet": {}}}, "cpu_target.runtime.unet"),
    ({**RUNTIME, "runtime": {"transformer": 3}}, "cpu_target.runtime.transformer"),
    ({**RUNTIME, "runtime": {"transformer": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": -1}}},
     "DYNAMIC_QUANTIZATION_GROUP_SIZE"),
    ({**RUNTIME, "extra": 1}, "cpu_target.extra"),
    ("avx2", "cpu_target"),
]


@pytest.mark.parametrize("cpu_target, needle", BAD_RECORDS)
def test_a_bad_recorded_choice_exits_2_in_one_line(q_avx2, tmp_path, capsys, cpu_target, needle):
    folder = with_record(q_avx2, tmp_path, cpu_target)
    code = main(["run", str(folder), "--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "1",
                 "--no-cache", "--output", str(tmp_path / "images")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_ERROR, err
    assert needle in err and "ovsd3.json" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "images").exists()


runtime_values = st.one_of(st.integers(min_value=-2**40, max_value=2**40), st.floats(allow_nan=True),
                           st.text(max_size=5), st.booleans(), st.none(), st.lists(st.integers(), max_size=2))


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(component=st.sampled_from([*layout.MODEL_COMPONENTS, "unet", ""]),
       option=st.sampled_from(["DYNAMIC_QUANTIZATION_GROUP_SIZE", "NUM_STREAMS", "dynamic"]), value=runtime_values)
def test_any_recorded_runtime_option_loads_or_is_refused_in_one_line(tmp_path_factory, component, option, value):
    folder = tmp_path_factory.mktemp("record")
    (folder / layout.OVSD3_RECORD).write_text(json.dumps(
        {"source": "x", "weight_format": "fp16", "has_t5": False,
         "cpu_target": {**RUNTIME, "runtime": {component: {option: value}}}}))
    valid = (component in layout.MODEL_COMPONENTS and option == "DYNAMIC_QUANTIZATION_GROUP_SIZE"
             and isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1 << 20)
    if valid:
        record = layout.FolderRecord.load(folder)
        assert layout.cpu_runtime_options(record, component) == {option: value}
    else:
        with pytest.raises(OvsdError) as error:
            layout.FolderRecord.load(folder)
        assert len(str(error.value).splitlines()) == 1 and "cpu_target" in str(error.value)
