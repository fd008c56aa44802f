#!/usr/bin/env bash
# ovsd3's whole job on the demo model that ships in the repository, offline, in a few minutes:
# convert it to OpenVINO IR, quantize that (INT8 transformer, INT4 text encoders and VAE), draw the same
# prompts with both, and write the report (size, speed, the share of digits drawn as asked, a grid), with an
# estimate of what INT8 gains at full size on this CPU (a few of SD3 Medium's blocks at their real width:
# the demo's 64x64 pictures are too small for INT8 to gain).
#
#   bash demo/quickstart.sh [OUT]        (default OUT: digits-quickstart; replaced if it exists)
#   FULL_SIZE=sd3.5-large bash demo/quickstart.sh      (the preset of the estimate; default sd3-medium)
set -euo pipefail
demo="$(cd "$(dirname "$0")" && pwd)"
out="${1:-digits-quickstart}"

ovsd3 convert "$demo/sd3-digits" "$out/fp16" --overwrite
ovsd3 quantize "$out/fp16" "$out/int8" --calib 200 --calib-cache "$out/calibration" --overwrite
ovsd3 report "$out/fp16" "$out/int8" --label FP16 --label INT8 --prompts 20 --out "$out/report" --overwrite \
    --full-size "${FULL_SIZE:-sd3-medium}"
echo "Pictures: $out/report/grid.png (a row per prompt: FP16, INT8)"
