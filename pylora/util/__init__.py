"""Helpers every layer shares: names in messages, bounded file reading, safetensors one tensor at a
time, bounded pattern matching, progress bars. Nothing here knows about LoRA."""
