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

from helpers import quantize


def attention_inputs_quantized(folder: Path) -> bool:
    """Whether any ScaledDotProductAttention of the folder's transformer reads a FakeQuantize output through the
    reshapes, transposes and concats between them (not through the projections: a MatMul ends the search)."""
    model = ov.Core().read_model(layout.model_xml(folder, layout.TRANSFORMER))

    def quantized(node, depth=8):
        producers = [value.get_node() for value in node.input_values()]
        return depth > 0 and any(producer.get_type_name() == "FakeQuantize" or (
            producer.get_type_name() != "MatMul" and quantized(producer, depth - 1)) for producer in producers)

    attentions = [op for op in model.get_ops() if op.get_type_name() == "ScaledDotProductAttention"]
    assert attentions, "the tiny transformer has no fused attention to look at"
    return any(quantized(op) for op in attentions)


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
    assert choice["why"] and choice["target"] == level
    assert target.choose("this", isa=level)["transformer"] == transformer


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
    assert attention_inputs_quantized(q_sd3) == (target.TABLE[target.detect_isa()].transformer == "int8")


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
