"""CUDA memory decisions proven without a GPU: ComfyUI's real `comfy.model_management` (COMFYUI_DIR) told that a
CUDA card with N GiB free is the load device, the pack's real nodes and loaders (fake_cuda.py, run with
COMFYUI_PYTHON). A weight moved to the fake "cuda" device raises on this CPU-only torch, which proves the attempt;
with --record-only the moves are listed instead, so the whole placement ComfyUI chose can be checked.

Without COMFYUI_DIR these tests are skipped, and the run ends with a warning saying so (conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_server import SKIP_REASON  # noqa: E402

HERE = Path(__file__).resolve().parent
CUDA_ERROR = "Torch not compiled with CUDA enabled"


@pytest.fixture(scope="module")
def comfy_python() -> str:
    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip(SKIP_REASON)
    return os.environ.get("COMFYUI_PYTHON") or sys.executable


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fake-cuda-models")


def fake_cuda(python: str, *args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([python, str(HERE / "fake_cuda.py"), *map(str, args)], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"fake_cuda.py {args} printed no result (exit {run.returncode}):\n{run.stderr[-4000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    assert "crash" not in result, result["crash"]
    return result


@pytest.mark.parametrize("free_gib", [22, 12, 8])
def test_vae_decode_of_a_5_s_video_puts_the_whole_vae_on_the_card(comfy_python, models, free_gib):
    """121 frames at 768x512 (Lite 5 s): the node asks for what its tiling needs, so ComfyUI moves every VAE
    weight to the card. It asked for 68 GiB (an untiled decode) before, and v0.33.0 then moved no weight of a
    plain-torch model (MIN_WEIGHT_MEMORY_RATIO 0 on NVIDIA) and decoded on the CPU, silently."""
    result = fake_cuda(comfy_python, "vae_decode", free_gib, 121, 768, 512, models, "--record-only")
    (asked,) = result["memory_required"]
    assert asked < (free_gib - 1.5) * 2**30, f"asked ComfyUI for {asked / 2**30:.1f} GiB on a {free_gib} GiB card"
    assert sorted(set(result["moved"])) == sorted(result["weights"]), (
        f"ComfyUI moved {len(set(result['moved']))} of {len(result['weights'])} VAE weights to the card: "
        f"{result['load_calls']}"
    )
    assert CUDA_ERROR in result["error"]  # the decode itself then ran on the (fake) card


def test_vae_decode_really_moves_weights_to_cuda(comfy_python, models):
    """Without --record-only the first weight move reaches torch, which raises here: the attempt is real."""
    result = fake_cuda(comfy_python, "vae_decode", 22, 121, 768, 512, models)
    assert result["moved"], result
    assert CUDA_ERROR in result["error"]


def test_text_encode_on_an_11_gib_card_swaps_qwen_layers_instead_of_a_partial_load(comfy_python):
    """Qwen2.5-VL-7B's language model (bf16) + CLIP-L (fp32) are 13.6 GiB. On an 11 GiB card ComfyUI's partial
    loader moved 183 of their 534 weights and left the rest of these plain transformers modules on the CPU, with
    nothing to cast them: the first layer left behind fails with mismatched devices. Now the encoders are never
    partially loaded by ComfyUI; everything but Qwen's decoder layers, and as many of those as fit, go to the card
    and the other layers are swapped in one at a time."""
    result = fake_cuda(comfy_python, "text_encode", 11, "--record-only")
    for call in result["load_calls"]:
        assert call["full_load"] or call["lowvram_model_memory"] > call["model_size"], result["load_calls"]
    (swap,) = result["swaps"]
    assert swap["device"] == "cuda:0" and 0 < swap["resident"] < swap["layers"], swap
    rest = result["model_bytes"] - swap["layers"] * swap["layer_bytes"]
    on_card = rest + (swap["resident"] + 2) * swap["layer_bytes"]  # + the swapped layer and its prefetch
    assert on_card <= 11 * 2**30 - 0.4 * 2**30, f"{on_card / 2**30:.2f} GiB planned on an 11 GiB card"


def test_text_encode_on_a_15_gib_card_loads_the_encoders_whole(comfy_python):
    result = fake_cuda(comfy_python, "text_encode", 15, "--record-only")
    assert result["swaps"] == []
    assert sorted(set(result["moved"])) == sorted(result["weights"]), result["load_calls"]


@pytest.mark.parametrize(
    "arch, free_gib, activations_gib",
    [("lite", 2.0, 1.2), ("lite", 3.0, 1.0), ("pro", 4.5, 4.0), ("pro", 12.0, 4.0)],
)
def test_comfyui_partial_loading_of_the_dit_holds_less_than_block_swap_would(comfy_python, arch, free_gib,
                                                                            activations_gib):  # fmt: skip
    """Why the pack has no Block Swap node (ComfyUI v0.33.0 turns third-party block-swap nodes into no-ops,
    comfy_extras/nodes_nop.py). The DiT as the loader builds it (comfy.ops.manual_cast layers) on a card too small for
    it: ComfyUI's own partial loading keeps what fits beside the activations and casts every other layer at use. Its
    peak (resident weights + the two largest layers in flight + activations) always fits the card, and on a card
    smaller than block swap's floor (non-block layers + two whole blocks, even with every block swapped) ComfyUI
    still fits: block swap never holds a peak that ComfyUI's partial loading cannot."""
    r = fake_cuda(comfy_python, "dit_partial", free_gib, arch, activations_gib, 0, "--record-only")
    gib = 2**30
    comfy_peak = r["comfy_resident"] + r["comfy_in_flight"] + activations_gib * gib
    comfy_floor = r["comfy_in_flight"]  # nothing resident: ComfyUI casts every layer at use
    swap_floor = r["swap_resident"] + r["swap_in_flight"]  # blocks_on_device=0
    assert r["comfy_cast_layers"] > 0, r  # the card is too small for the whole DiT: ComfyUI loaded it partially
    assert comfy_peak <= free_gib * gib, f"{comfy_peak / gib:.2f} GiB on a {free_gib} GiB card: {r}"
    assert comfy_floor < swap_floor, r
    if swap_floor + activations_gib * gib > free_gib * gib:  # block swap cannot run here at all; ComfyUI does
        assert r["comfy_resident"] < swap_floor
