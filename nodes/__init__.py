"""ComfyUI nodes: thin adapters over kandinsky_core (model management, folder_paths, progress, previews)."""
