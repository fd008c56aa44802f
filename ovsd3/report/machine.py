"""What a measurement ran on: recorded with every report and benchmark."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(device: str, measured: dict) -> dict:
    """The machine, with what a child process saw of OpenVINO (``measure.device_info``)."""
    return {"openvino": measured["openvino"], "device": device, "execution_devices": measured["execution_devices"],
            "device_names": measured["device_names"], "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": processor_name()}
