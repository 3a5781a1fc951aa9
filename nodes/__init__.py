"""ComfyUI nodes: thin adapters over kandinsky_core (model management, folder_paths, progress, previews)."""

from .compile import Compile
from .loaders import LoadDiT, LoadTextEncoders, LoadVAE
from .lora import LoadLoRA
from .magcache import MagCacheCalibrate, MagCacheNode
from .sampler import Sampler
from .text import PromptExpansion, TextEncode
from .vae import VAEDecode, VAEEncode

NODES = {
    "Kandinsky5LoadDiT": (LoadDiT, "Load Kandinsky 5 DiT"),
    "Kandinsky5LoadTextEncoders": (LoadTextEncoders, "Load Kandinsky 5 Text Encoders"),
    "Kandinsky5LoadVAE": (LoadVAE, "Load Kandinsky 5 VAE"),
    "Kandinsky5LoadLoRA": (LoadLoRA, "Load Kandinsky 5 LoRA"),
    "Kandinsky5TextEncode": (TextEncode, "Kandinsky 5 Text Encode"),
    "Kandinsky5PromptExpansion": (PromptExpansion, "Kandinsky 5 Prompt Expansion"),
    "Kandinsky5Sampler": (Sampler, "Kandinsky 5 Sampler"),
    "Kandinsky5VAEDecode": (VAEDecode, "Kandinsky 5 VAE Decode"),
    "Kandinsky5VAEEncode": (VAEEncode, "Kandinsky 5 VAE Encode"),
    "Kandinsky5MagCache": (MagCacheNode, "Kandinsky 5 MagCache"),
    "Kandinsky5MagCacheCalibrate": (MagCacheCalibrate, "Kandinsky 5 MagCache Calibrate"),
    "Kandinsky5Compile": (Compile, "Kandinsky 5 Compile"),
}
NODE_CLASS_MAPPINGS = {key: cls for key, (cls, _) in NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {key: name for key, (_, name) in NODES.items()}
