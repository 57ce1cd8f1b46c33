"""Device check of ATFM's ``method.cuda_graphs`` (run by scripts/device_check_speed.sh on a CUDA machine).

The release's ST-Net at paper scale (128 px synthetic, untrained weights), 100 samples of one image, float32
and bf16 autocast: masks with and without CUDA graphs (same draws) must agree on >= 99.9 % of the pixels
(float32: expected bit-equal), and the median wall time of 5 calls of each is printed with their ratio.
Exit 1 when a check fails.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from amisbench.config import resolve
from amisbench.factory import build_method
from amisbench.registry import DATASETS


def main() -> int:
    dev = torch.device("cuda")
    res = resolve("atfm", "synthetic", "paper")
    ds = DATASETS.get("synthetic")(res.cfg.dataset, "test")
    torch.manual_seed(0)
    model = build_method(res, ds.spec, device=dev, sampling=True)
    image = ds[0]["image"][None].to(dev)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}; ST-Net "
          f"{sum(p.numel() for p in model.st_net.parameters()):,} parameters, attention {model.cfg.attention}, "
          f"{model.cfg.steps} Euler steps, 100 samples of one 128 px image")
    ok = True
    for amp in (False, True):
        out, secs = {}, {}
        for graphs in (False, True):
            model.cfg.cuda_graphs = graphs
            times = []
            for rep in range(6):  # the first call warms up (and captures the graph)
                torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    s = model.sample(image, 100, generator=torch.Generator(dev).manual_seed(1))
                torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - t0)
            out[graphs], secs[graphs] = s, statistics.median(times[1:])
        agree = float((out[True] == out[False]).float().mean())
        exact = torch.equal(out[True], out[False])
        good = agree >= 0.999
        ok &= good
        print(f"{'bf16 autocast' if amp else 'float32'}: eager {secs[False]:.3f} s, CUDA graphs {secs[True]:.3f} s "
              f"(eager / graphs {secs[False] / secs[True]:.2f}x); masks equal on {agree:.5%} of pixels "
              f"(bit-equal: {exact}) -> {'ok' if good else 'FAIL'}")
    model.cfg.cuda_graphs = False
    with torch.no_grad():
        flat = torch.rand((800, 1, *image.shape[-2:]), device=dev)
        chunk = model.chunk_size(800, flat, image.expand(800, -1, -1, -1))
    print(f"sample_chunk auto: {chunk} samples per chunk for 8 images x 100 samples (float32)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
