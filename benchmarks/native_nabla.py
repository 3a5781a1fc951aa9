"""ComfyUI's own Kandinsky 5 model (comfy.ldm.kandinsky5, v0.4 and later): one forward with and without our NABLA
patch (nodes/native.py), side by side in one run, and the ratio. Run with ComfyUI's Python and COMFYUI_DIR set:

    COMFYUI_DIR=... $COMFYUI_PYTHON benchmarks/native_nabla.py                # Lite 10 s token count (61 x 32 x 48)
    COMFYUI_DIR=... $COMFYUI_PYTHON benchmarks/native_nabla.py --frames 16    # fewer latent frames, same frame size

The model is Lite's width (model_dim 1792, 14 heads of 128) with reduced depth (--blocks visual blocks, 1 text block),
random weights, float32 on the CPU (--device to change). The token count of Lite 10 s at 768x512: 241 frames ->
61 latent frames of 32 x 48 tokens = 93,696 tokens. NABLA uses the Lite 10 s settings (P 0.9, windows 11 / 3 / 3);
the table gives the share of key blocks the NABLA masks kept. Dense attention is ComfyUI's own (optimized_attention).
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=61, help="latent frames (61 = 241 video frames, Lite 10 s)")
    ap.add_argument("--height", type=int, default=64, help="latent height (64 = 512 px)")
    ap.add_argument("--width", type=int, default=96, help="latent width (96 = 768 px)")
    ap.add_argument("--blocks", type=int, default=1, help="visual blocks (Lite has 32)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    a = ap.parse_args()

    sys.path[:0] = [str(REPO), os.environ["COMFYUI_DIR"]]
    import comfy.options

    comfy.options.args_parsing = False
    from comfy.cli_args import args

    args.cpu = not a.device.startswith("cuda")
    import comfy.ops
    import comfy.patcher_extension
    import torch
    from comfy.ldm.kandinsky5.model import Kandinsky5

    from benchmarks.results import publish
    from kandinsky_core import variants
    from nodes.model_options import KEY, Kandinsky5Options, NablaChoice
    from nodes.native import NABLA_KEY, NativeNabla

    torch.manual_seed(0)
    lite = variants.LITE_VIDEO
    with torch.device(a.device):
        model = Kandinsky5(
            in_visual_dim=16, model_dim=lite.model_dim, ff_dim=lite.ff_dim, time_dim=lite.time_dim,
            visual_embed_dim=lite.in_channels * 4, num_text_blocks=1, num_visual_blocks=a.blocks,
            axes_dims=lite.axes_dims, operations=comfy.ops.disable_weight_init,
        ).eval().requires_grad_(False)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, lite.in_channels, a.frames, a.height, a.width, generator=g).to(a.device)
    context = torch.randn(1, 128, lite.in_text_dim, generator=g).to(a.device)
    pooled = torch.randn(1, lite.in_text_dim2, generator=g).to(a.device)
    timestep = torch.tensor([500.0], device=a.device)
    n = lite_nabla = variants.VARIANTS["t2v-lite-sft-10s"].nabla
    stats: dict = {}
    wrapper = NativeNabla({}, stats)
    setting = NablaChoice("on", P=n.P, wT=n.wT, wH=n.wH, wW=n.wW)

    def forward(nabla: bool) -> float:
        to = {KEY: Kandinsky5Options(nabla=setting)}
        if nabla:
            to["wrappers"] = {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {NABLA_KEY: [wrapper]}}
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model(x, timestep, context, pooled, transformer_options=to)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    forward(True)  # warm-up (and the mask's density, recorded in stats)
    kept = stats["kept"] / stats["total"]
    dense, sparse = [], []
    for _ in range(a.repeats):  # interleaved, so load on a shared machine hits both alike
        dense.append(forward(False))
        sparse.append(forward(True))
    tokens = a.frames * (a.height // 2) * (a.width // 2)
    d, s = statistics.median(dense), statistics.median(sparse)
    report = (
        f"### Native Kandinsky 5 forward with / without our NABLA patch ({datetime.datetime.now():%Y-%m-%d %H:%M})\n\n"
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {a.device}, "
        f"threads {torch.get_num_threads()}; ComfyUI's Kandinsky5 at Lite width, {a.blocks} visual block(s) + 1 text "
        f"block, float32; latent {a.frames} x {a.height} x {a.width} = {tokens} tokens; NABLA P {lite_nabla.P:g}, "
        f"windows {n.wT} / {n.wH} / {n.wW}, key blocks kept {kept:.1%}; median of {a.repeats}\n\n"
        "| forward | time (s) | ratio |\n| --- | --- | --- |\n"
        f"| dense (ComfyUI's attention) | {d:.2f} | 1.00 |\n"
        f"| our NABLA patch | {s:.2f} | {d / s:.2f}x faster |\n"
    )
    publish(report, append=not a.no_append)


if __name__ == "__main__":
    main()
