"""Inference speed and peak memory of every registered architecture at 256x256.

For each architecture, batch 1 and 8, on the CPU and on CUDA when present: images per second
(after warm-up, under torch.inference_mode) and peak memory (resident set size on the CPU,
max allocated on CUDA). Each configuration runs in its own process so peaks do not mix.
Prints a Markdown table; never fails a build.

    .venv/bin/python benchmarks/infer.py [--seconds 3] [--archs unet,deeplabv3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(arch: str, batch: int, device_name: str, seconds: float) -> dict[str, float]:
    import torch

    from radlens.models.networks import build, parameter_count

    device = torch.device(device_name)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build(arch).to(device).eval()
    images = torch.rand(batch, 1, 256, 256, device=device)
    with torch.inference_mode():
        for _ in range(3):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(images)
            done += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images_per_s": done / elapsed, "peak_mb": peak_mb,
            "model_mb_before": rss_before / 1024, "parameters": parameter_count(model),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--archs", default="")
    parser.add_argument("--worker", nargs=3, metavar=("ARCH", "BATCH", "DEVICE"))
    options = parser.parse_args()
    if options.worker:
        arch, batch, device = options.worker
        print(json.dumps(measure(arch, int(batch), device, options.seconds)))
        return

    import torch

    from radlens.models.networks import REGISTRY

    archs = [a for a in options.archs.split(",") if a] or list(REGISTRY)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for arch in archs:
            for batch in (1, 8):
                result = subprocess.run(
                    [sys.executable, __file__, "--seconds", str(options.seconds), "--worker",
                     arch, str(batch), device], capture_output=True, text=True,
                    env=dict(os.environ, PYTHONWARNINGS="ignore"))
                if result.returncode != 0:
                    rows.append((device, arch, batch, None, result.stderr.strip()[-200:]))
                    continue
                rows.append((device, arch, batch, json.loads(result.stdout.splitlines()[-1]),
                             ""))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"## Inference at 256x256 ({options.seconds:.0f} s per configuration)\n")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, GPU: {gpu}; python "
          f"{platform.python_version()}; torch {torch.__version__}\n")
    print("| device | architecture | parameters | batch | images/s | peak memory (MiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for device, arch, batch, result, error in rows:
        if result is None:
            print(f"| {device} | {arch} | | {batch} | failed: {error} | |")
            continue
        print(f"| {device} | {arch} | {result['parameters'] / 1e6:.2f} M | {batch} | "
              f"{result['images_per_s']:.1f} | {result['peak_mb']:.0f} |")
    print("\nPeak memory is the process's resident set on the CPU (model, activations, "
          "runtime) and torch's max allocated on CUDA.")


if __name__ == "__main__":
    main()
