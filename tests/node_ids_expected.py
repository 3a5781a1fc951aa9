"""The pack's node IDs and display names (issue 12): K5..., so that none collides with the official kandinsky-5
`comfyui/` nodes or ComfyUI core's Kandinsky 5 nodes. One list for the unit, ID and integration tests."""

EXPECTED_IDS = {
    "K5LoadDiT": "Load Kandinsky 5 DiT",
    "K5LoadTextEncoders": "Load Kandinsky 5 Text Encoders",
    "K5LoadVAE": "Load Kandinsky 5 VAE",
    "K5LoadLoRA": "Load Kandinsky 5 LoRA",
    "K5TextEncode": "Kandinsky 5 Text Encode",
    "K5PromptExpansion": "Kandinsky 5 Prompt Expansion",
    "K5Sampler": "Kandinsky 5 Sampler",
    "K5VAEDecode": "Kandinsky 5 VAE Decode",
    "K5VAEEncode": "Kandinsky 5 VAE Encode",
    "K5MagCache": "Kandinsky 5 MagCache",
    "K5MagCacheCalibrate": "Kandinsky 5 MagCache Calibrate",
    "K5Nabla": "Kandinsky 5 NABLA",
    "K5Compile": "Kandinsky 5 Compile",
}
