"""Foreign and saved weights: Keras Hub presets, fine-tuning from a run or a preset."""
