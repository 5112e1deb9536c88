"""LoRA on any PyTorch model: LoraConfig, the LoRA layers, injection by module names and model-level merge."""
